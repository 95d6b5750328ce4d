//! The servers around the sidecar, driven from the fault tests (`backstop
//! torture`, `backstop chaos`): restarting the local PostgreSQL or Redis as
//! scripts/postgres.sh and scripts/redis.sh run them, and running
//! `rabbitmqctl` or another command off the async runtime, and closing the
//! compensation store rows a run leaves behind.

use anyhow::Context;
use backstop::store::{CompensationStore, ListFilter, ManualAction, SqlStore};
use backstop_testkit::rabbitmqctl;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a Redis restart keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RedisRestart {
    /// `SHUTDOWN NOSAVE`: every key is gone, as scripts/redis.sh keeps none
    /// (no RDB, no AOF): a crash of a Redis without persistence.
    DropData,
    /// `SHUTDOWN SAVE` into a dump of its own, loaded by the new server:
    /// the restart of a Redis that persists, which a dedup store must.
    KeepData,
}

/// Restarts the PostgreSQL or Redis server among `urls` (loopback only);
/// SQLite has no server. Says what it restarted.
pub(crate) async fn restart_servers(urls: &[&str], redis: RedisRestart) -> anyhow::Result<String> {
    let mut done = Vec::new();
    for (scheme, name) in [("redis", "Redis"), ("postgres", "PostgreSQL")] {
        let Some(url) = urls.iter().find(|u| u.starts_with(scheme)) else {
            continue;
        };
        let parsed = reqwest::Url::parse(url).context("parsing the store URL")?;
        let loopback = parsed
            .host_str()
            .is_some_and(|h| matches!(h, "127.0.0.1" | "localhost" | "[::1]"));
        if !loopback {
            return Ok(format!(
                "server restart skipped ({name} is not on loopback)"
            ));
        }
        if scheme == "redis" {
            restart_redis(parsed.port().unwrap_or(6379), redis).await?;
        } else {
            restart_postgres().await?;
        }
        done.push(name);
    }
    Ok(if done.is_empty() {
        "server restart skipped (SQLite has no server)".to_owned()
    } else {
        format!("{} restart", done.join("+"))
    })
}

/// `pg_ctlcluster <newest version> main restart` (a fast shutdown: open
/// connections are closed, committed data stays).
pub(crate) async fn restart_postgres() -> anyhow::Result<()> {
    let version = std::fs::read_dir("/usr/lib/postgresql")
        .context("finding the PostgreSQL version")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|v| v.parse::<u32>().ok())
        .max()
        .context("no PostgreSQL under /usr/lib/postgresql")?;
    run_command_closing_fds("pg_ctlcluster", &[&version.to_string(), "main", "restart"]).await
}

/// Restarts the Redis on 127.0.0.1:`port` as scripts/redis.sh starts it,
/// and waits until it answers PING (30 s at most).
pub(crate) async fn restart_redis(port: u16, keep: RedisRestart) -> anyhow::Result<()> {
    let port = port.to_string();
    let at = ["-h", "127.0.0.1", "-p", port.as_str()];
    let mut start = vec!["--bind", "127.0.0.1", "--port", &port, "--daemonize", "yes"];
    start.extend(["--save", "", "--appendonly", "no"]);
    start.extend(["--logfile", "/tmp/backstop-redis.log"]);
    // Where a kept dump is loaded from: a folder of its own, so that a later
    // start of scripts/redis.sh (from any folder) does not load it.
    let home = std::env::temp_dir().join(format!("backstop-redis-{port}"));
    let home_text = home.display().to_string();
    match keep {
        RedisRestart::DropData => {
            // Not running already is fine: it is started again below.
            let _ = run_command("redis-cli", &[&at[..], &["shutdown", "nosave"]].concat()).await;
        }
        RedisRestart::KeepData => {
            // `dir` is a protected setting (Redis 7): the dump goes where
            // the server says, and moves to the folder of its own.
            let saved = std::path::Path::new(&redis_setting(&at, "dir").await?)
                .join(redis_setting(&at, "dbfilename").await?);
            anyhow::ensure!(
                !saved.exists(),
                "{} exists already: a Redis restart that keeps its keys would overwrite it",
                saved.display()
            );
            // redis-cli may see the connection end before an answer.
            let _ = run_command("redis-cli", &[&at[..], &["shutdown", "save"]].concat()).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while run_command("redis-cli", &[&at[..], &["ping"]].concat())
                .await
                .is_ok()
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "Redis still answers 30 s after SHUTDOWN SAVE"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            std::fs::create_dir_all(&home)
                .with_context(|| format!("creating {}", home.display()))?;
            std::fs::copy(&saved, home.join("dump.rdb")).with_context(|| {
                format!(
                    "moving Redis's dump {} to {}",
                    saved.display(),
                    home.display()
                )
            })?;
            std::fs::remove_file(&saved)
                .with_context(|| format!("removing {}", saved.display()))?;
            start.extend(["--dir", &home_text, "--dbfilename", "dump.rdb"]);
        }
    }
    run_command_closing_fds("redis-server", &start).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if run_command("redis-cli", &[&at[..], &["ping"]].concat())
            .await
            .is_ok()
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Redis did not answer PING within 30 s of its restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if keep == RedisRestart::KeepData {
        // Loaded: the running server does not need the file any more (it
        // keeps the folder as its `dir`).
        let _ = std::fs::remove_file(home.join("dump.rdb"));
    }
    Ok(())
}

/// Closes every descriptor above 2, then runs `"$@"` in its place.
const CLOSE_AND_EXEC: &str = r#"for fd in /proc/$$/fd/*; do fd=${fd##*/}; if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null; fi; done; exec "$@""#;

/// Runs `program` like [`run_command`], with no descriptor above 2 open:
/// a server it starts must not keep the caller's descriptors as long as it
/// runs (a `flock /tmp/broker.lock` around this command would stay held by
/// the restarted Redis, and every later flock would wait for ever). Through
/// bash, since the workspace forbids the `unsafe` a `pre_exec` would need.
pub(crate) async fn run_command_closing_fds(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-c", CLOSE_AND_EXEC, "backstop-server-start", program];
    all.extend_from_slice(args);
    run_command("bash", &all).await
}

/// `CONFIG GET <name>` of the Redis at `at` (`-h`, `-p` arguments).
async fn redis_setting(at: &[&str], name: &str) -> anyhow::Result<String> {
    let mut args: Vec<String> = at.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["config".to_owned(), "get".to_owned(), name.to_owned()]);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("redis-cli")
            .args(&args)
            .stderr(Stdio::null())
            .output()
            .context("running redis-cli")
    })
    .await??;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(key), Some(value)) if key == name && !value.is_empty() => Ok(value.to_owned()),
        _ => anyhow::bail!("cannot read Redis's answer to CONFIG GET {name}: {text:?}"),
    }
}

/// Runs `program` with `args` off the runtime; fails unless it exits 0.
pub(crate) async fn run_command(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let status = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running {program}"))
    })
    .await??;
    anyhow::ensure!(status.success(), "the command exited with {status}");
    Ok(())
}

/// `rabbitmqctl <args>` off the runtime; its stdout.
pub(crate) async fn rabbitmqctl_blocking(args: Vec<String>) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(&args).map_err(anyhow::Error::msg)
    })
    .await?
}

/// Discards the unfinished rows of `queue` (audited as `actor`), then
/// purges its finished rows: a shared PostgreSQL store keeps nothing of a
/// run that is over. Best effort.
pub(crate) async fn forget_rows(store: &SqlStore, queue: &str, actor: &str) {
    let filter = ListFilter {
        queue: Some(queue.to_owned()),
        limit: Some(1_000_000),
        ..ListFilter::default()
    };
    if let Ok(rows) = store.list(&filter).await {
        for row in rows.iter().filter(|r| !r.status.is_finished()) {
            let _ = store
                .act(row.id, ManualAction::Discard, actor, Some("run over"))
                .await;
        }
    }
    let _ = store
        .purge_finished(backstop::retry::now_ms() as i64 + 1_000, Some(queue))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptors `ls /proc/self/fd` sees when run by `script`, in a
    /// shell that opened descriptor 7 first (as `flock FILE cmd` leaves its
    /// lock open in `cmd`).
    fn descriptors_seen(script: &str) -> Vec<String> {
        let output = Command::new("bash")
            .env("CLOSE_AND_EXEC", CLOSE_AND_EXEC)
            .args(["-c", &format!("exec 7</dev/null; {script}")])
            .output()
            .expect("run bash");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_started_server_keeps_no_descriptor_of_its_caller() {
        // Without the wrapper the inherited descriptor reaches the program.
        assert!(descriptors_seen("exec ls /proc/self/fd").contains(&"7".to_owned()));
        let seen = descriptors_seen(r#"exec bash -c "$CLOSE_AND_EXEC" start ls /proc/self/fd"#);
        assert!(!seen.contains(&"7".to_owned()), "{seen:?}");
        assert!(seen.contains(&"2".to_owned()), "{seen:?}");
    }
}
