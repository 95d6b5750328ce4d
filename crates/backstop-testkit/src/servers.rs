//! Private database servers a test may stop and start: a PostgreSQL
//! cluster of its own ([`PrivatePostgres`]) and a Redis ([`PrivateRedis`]),
//! each on a free loopback port, never the shared ones other tests use.
//!
//! PostgreSQL runs as the `postgres` OS user (`runuser -u postgres --`),
//! from `/usr/lib/postgresql/15/bin` (or `BACKSTOP_PG_BIN`), with trust
//! authentication on loopback. Both are killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free loopback port (bound once, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn run(what: &str, command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of this test's own, in a temporary directory.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    up: bool,
}

impl PrivatePostgres {
    /// Creates the cluster (`initdb`) and starts it.
    pub fn start() -> Self {
        let bin = PathBuf::from(
            std::env::var("BACKSTOP_PG_BIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned()),
        );
        let dir = std::env::temp_dir().join(crate::unique("private-pg"));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        run(
            "chown the cluster's directory",
            Command::new("chown").arg("postgres:postgres").arg(&dir),
        );
        let mut pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
            up: false,
        };
        run(
            "initdb",
            pg.as_postgres("initdb")
                .args(["-U", "postgres", "--auth=trust", "-D"])
                .arg(pg.data()),
        );
        pg.resume();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_postgres(&self, tool: &str) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .stdin(Stdio::null());
        command
    }

    /// Its URL (user `postgres`, database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts it again on the same port and data directory; returns once it
    /// accepts connections.
    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        run(
            "pg_ctl start",
            self.as_postgres("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data())
                .args(["-o", &options, "-l"])
                .arg(self.dir.join("log"))
                .arg("start"),
        );
        self.up = true;
    }

    /// A fast shutdown (`pg_ctl stop -m fast`): connections are closed.
    pub fn stop(&mut self) {
        run(
            "pg_ctl stop",
            self.as_postgres("pg_ctl")
                .args(["-w", "-m", "fast", "-D"])
                .arg(self.data())
                .arg("stop"),
        );
        self.up = false;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.up {
            let _ = self
                .as_postgres("pg_ctl")
                .args(["-w", "-m", "immediate", "-D"])
                .arg(self.data())
                .arg("stop")
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis of this test's own. It persists every write before answering
/// (`appendonly yes`, `appendfsync always`, no RDB snapshots): a dedup store
/// that forgot its done keys in an outage could not keep its promise, and a
/// kill (the harshest stop) loses nothing acknowledged.
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts `redis-server` on a free loopback port.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(crate::unique("private-redis"));
        std::fs::create_dir_all(&dir).expect("create the redis directory");
        let mut redis = PrivateRedis {
            port: free_port(),
            dir,
            child: None,
        };
        redis.resume();
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and directory (it reloads its
    /// append-only file); returns once it accepts connections.
    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the private redis-server did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (`SIGKILL`: no snapshot, no goodbye to its clients); what
    /// it acknowledged is in its append-only file.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
