//! A headless Chromium driven over WebDriver, for the review console's
//! end-to-end tests.
//!
//! One `chromedriver` serves a whole test binary: the first
//! [`Browser::start`] launches it on a free loopback port and waits until its
//! `/status` says it is ready; every test then opens its own browser session
//! on it (a fresh profile, headless, 1280x1000). The binaries come from
//! `BACKSTOP_CHROMEDRIVER` / `BACKSTOP_CHROMIUM`, else `chromedriver` and
//! `chromium` on the `PATH` (scripts/chromium.sh installs Debian's).
//!
//! Cleanup does not depend on the test ending well:
//! - a [`Browser`] dropped without [`Browser::close`] (a test that panicked)
//!   deletes its session with a plain blocking request, which ends that
//!   Chromium;
//! - `chromedriver` runs in a process group of its own under a small shell
//!   that holds a pipe from the test binary: when the binary exits, however
//!   it exits, the pipe closes and the shell kills the whole group
//!   (chromedriver and every Chromium it started).
//!
//! Screenshots land in `target/console-screenshots/<test>/<name>.png`
//! (`BACKSTOP_SCREENSHOT_DIR` replaces `target/console-screenshots`).

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The Chromium flags of every session.
pub const CHROMIUM_ARGS: [&str; 4] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--window-size=1280,1000",
];

/// How long a page, an element or the driver may take before a test fails.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(15);

/// The shared `chromedriver` of this test binary.
struct Driver {
    port: u16,
    /// The shell that owns chromedriver's process group; never waited for:
    /// it exits with the test binary.
    _shell: Child,
    /// Held open for the life of the binary: its end is the shell's signal.
    _lifeline: ChildStdin,
}

static DRIVER: OnceCell<Driver> = OnceCell::const_new();

fn chromedriver_binary() -> String {
    std::env::var("BACKSTOP_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned())
}

fn chromium_binary() -> Option<String> {
    if let Ok(binary) = std::env::var("BACKSTOP_CHROMIUM") {
        return Some(binary);
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map(str::to_owned)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Where the screenshots of all tests go: `BACKSTOP_SCREENSHOT_DIR`, else
/// `console-screenshots` in the target directory of the running test binary
/// (`target/<profile>/deps/<test>` → `target/console-screenshots`).
pub fn screenshot_root() -> PathBuf {
    if let Ok(dir) = std::env::var("BACKSTOP_SCREENSHOT_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary's path: {e}"));
    let target = exe
        .ancestors()
        .nth(3)
        .unwrap_or_else(|| panic!("{} is not under target/<profile>/deps", exe.display()));
    target.join("console-screenshots")
}

/// A blocking HTTP/1.1 request to the driver on loopback (chromedriver
/// refuses 1.0 and keeps the connection open, so the body is read by its
/// `Content-Length`); the status and body, or `None` when it does not answer.
fn driver_request(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::BufRead;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(DEFAULT_WAIT)).ok()?;
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .ok()?;
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Whether the driver's `/status` says it is ready. An answer that is not
/// JSON is a failure, never a "not yet".
fn driver_ready(port: u16) -> bool {
    match driver_request(port, "GET", "/status") {
        None => false,
        Some((_, body)) => {
            let status: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("chromedriver's /status is not JSON ({e}): {body}"));
            status["value"]["ready"] == true
        }
    }
}

/// Starts chromedriver on a free port and waits until it is ready (a port
/// taken in between: it exits, and another port is tried).
async fn start_driver() -> Driver {
    let binary = chromedriver_binary();
    let root = screenshot_root();
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    let log = root.join("chromedriver.log");
    for _ in 0..3 {
        let port = free_port();
        // `cat` returns when the test binary's end of the pipe closes; then
        // the whole group goes, the shell included.
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(
                r#""$0" --port="$1" --log-path="$2" --log-level=WARNING >/dev/null 2>&1 &
                   cat >/dev/null
                   trap '' TERM
                   kill -TERM -$$
                   sleep 2
                   kill -KILL -$$"#,
            )
            .arg(&binary)
            .arg(port.to_string())
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary} through sh: {e}"));
        let lifeline = shell
            .stdin
            .take()
            .unwrap_or_else(|| panic!("the driver shell's stdin is piped"));
        let deadline = tokio::time::Instant::now() + DEFAULT_WAIT;
        loop {
            if tokio::task::spawn_blocking(move || driver_ready(port))
                .await
                .unwrap_or(false)
            {
                return Driver {
                    port,
                    _shell: shell,
                    _lifeline: lifeline,
                };
            }
            let exited = shell.try_wait().ok().flatten().is_some();
            if exited || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not ready: end this group and try another port.
        drop(lifeline);
        let _ = shell.wait();
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    panic!(
        "{binary} did not become ready within {DEFAULT_WAIT:?} (run scripts/chromium.sh); its log:\n{logged}"
    )
}

/// One headless Chromium session on the binary's shared chromedriver, with
/// its screenshot folder. Derefs to the [`fantoccini::Client`].
pub struct Browser {
    client: Client,
    session: Option<String>,
    port: u16,
    dir: PathBuf,
}

impl std::ops::Deref for Browser {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Browser {
    /// Opens a session for the test `test` (the name of its screenshot
    /// folder, which is emptied first), starting the shared chromedriver on
    /// first use.
    pub async fn start(test: &str) -> Browser {
        let driver = DRIVER.get_or_init(start_driver).await;
        let mut options = serde_json::Map::new();
        options.insert("args".into(), serde_json::json!(CHROMIUM_ARGS));
        if let Some(binary) = chromium_binary() {
            options.insert("binary".into(), binary.into());
        }
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), "chrome".into());
        capabilities.insert("goog:chromeOptions".into(), options.into());
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|e| panic!("cannot open a Chromium session: {e}"));
        let session = client
            .session_id()
            .await
            .unwrap_or_else(|e| panic!("the session's id: {e}"));
        let dir = screenshot_root().join(test);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Browser {
            client,
            session,
            port: driver.port,
            dir,
        }
    }

    /// The client, to use fantoccini's whole API.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This test's screenshot folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens `url`, panicking when the browser cannot.
    pub async fn open(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// Saves what the window shows as `<dir>/<name>.png` and returns the
    /// path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Like [`screenshot`](Self::screenshot), with the window first grown to
    /// the page's full height (at most 4,000 pixels) and restored after.
    pub async fn screenshot_full(&self, name: &str) -> PathBuf {
        // The window is taller than its viewport by the browser's frame.
        let height = self
            .client
            .execute(
                "return Math.ceil(document.documentElement.scrollHeight \
                 + window.outerHeight - window.innerHeight);",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("the page's height: {e}"))
            .as_u64()
            .unwrap_or_else(|| panic!("the page's height is not a number"))
            .clamp(1000, 4000);
        let _ = self.client.set_window_size(1280, height as u32).await;
        let path = self.screenshot(name).await;
        let _ = self.client.set_window_size(1280, 1000).await;
        path
    }

    /// Waits up to [`DEFAULT_WAIT`] for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(DEFAULT_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css} within {DEFAULT_WAIT:?}: {e}"))
    }

    /// The visible text of the first element matching `css` (waited for).
    pub async fn text(&self, css: &str) -> String {
        self.wait_for(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("the text of {css}: {e}"))
    }

    /// The visible text of the first element matching `css` now, or `None`
    /// when there is none or the page was replaced while reading it (a page
    /// that refreshes itself): for polling with `wait_until`.
    pub async fn try_text(&self, css: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Every element matching `css` now (none is not an error).
    pub async fn all(&self, css: &str) -> Vec<fantoccini::elements::Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
    }

    /// Replaces the value of the field matching `css` with `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.wait_for(css).await;
        field
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        field
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.wait_for(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Clicks the first element matching `css` now: false when there is
    /// none or the page was replaced under the click (a page that refreshes
    /// itself), for polling with `wait_until`.
    pub async fn try_click(&self, css: &str) -> bool {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.click().await.is_ok(),
            Err(_) => false,
        }
    }

    /// Ends the session (and its Chromium).
    pub async fn close(mut self) {
        self.session = None;
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// A session not closed (a test that panicked) is deleted with a plain
    /// blocking request, which ends its Chromium.
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = driver_request(self.port, "DELETE", &format!("/session/{session}"));
        }
    }
}
