//! The review console's HTTP rules, against a real `backstop console`
//! process on a SQLite store: the login wall, CSRF, the security headers,
//! the refusal to listen off loopback without auth, secrets kept out of the
//! logs, hostile rows shown inert, and audited actions.

use crate::rows;
use backstop::retry::now_ms;
use backstop::store::{CompensationStore, NewFailedMessage, SqlStore, Status};
use backstop_testkit::unique;
use lapin::types::{AMQPValue, FieldTable, LongString};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const TOKEN: &str = "t0ken-9f8e7d6c5b4a";
const PASSWORD: &str = "pa55word-1a2b3c4d";

/// A running `backstop console` on a fresh SQLite store.
struct Console {
    child: Child,
    base: String,
    stderr: PathBuf,
    store: SqlStore,
    http: reqwest::Client,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new path in the temp folder ending in `.extension`.
fn temp(extension: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}.{extension}", unique("console-http")))
}

/// Starts the console with `[console] extra` on a new store.
async fn start(extra: &str) -> Console {
    start_with("", extra).await
}

/// Starts the console with `sections` (TOML before `[store]`) and
/// `[console] extra` on a new store.
async fn start_with(sections: &str, extra: &str) -> Console {
    let db = temp("db");
    let url = format!("sqlite://{}", db.display());
    let store = SqlStore::connect(&url).await.expect("create the store");
    let config = temp("toml");
    std::fs::write(
        &config,
        format!(
            "{sections}\n[store]\nurl = {url:?}\n\n[console]\nlisten = \"127.0.0.1:0\"\n{extra}\n"
        ),
    )
    .expect("write the config");
    let stderr = temp("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["--log", "info", "console", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("BACKSTOP_CONSOLE_TOKEN")
        .env_remove("BACKSTOP_CONSOLE_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start backstop console");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("join")
    .expect("read stdout");
    let base = line
        .trim()
        .strip_prefix("backstop console: serving on ")
        .unwrap_or_else(|| {
            panic!(
                "unexpected first line {line:?}; stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        })
        .trim_end_matches('/')
        .to_owned();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    Console {
        child,
        base,
        stderr,
        store,
        http,
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, NON_ALPHANUMERIC),
                utf8_percent_encode(v, NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The value of cookie `name` set by a response.
fn set_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(SET_COOKIE).iter().find_map(|v| {
        let text = v.to_str().ok()?;
        let (pair, _) = text.split_once(';').unwrap_or((text, ""));
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// The `value` of the element of `html` with `name="..."` (hidden fields).
fn hidden(html: &str, name: &str) -> String {
    let at = html
        .find(&format!("name=\"{name}\""))
        .unwrap_or_else(|| panic!("no field {name} in {html}"));
    let rest = &html[at..];
    let start = rest.find("value=\"").expect("a value") + 7;
    let end = rest[start..].find('"').expect("end of value");
    rest[start..start + end].to_owned()
}

/// Every response of the console carries these.
fn assert_safe_headers(what: &str, headers: &HeaderMap) {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: no {name} header in {headers:?}"))
            .to_owned()
    };
    assert_eq!(
        get("content-security-policy"),
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        "{what}"
    );
    assert_eq!(get("x-frame-options"), "DENY", "{what}");
    assert_eq!(get("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(get("referrer-policy"), "no-referrer", "{what}");
    assert_eq!(get("cache-control"), "no-store", "{what}");
}

impl Console {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path` with `cookie`; (status, headers, body), headers checked.
    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut request = self.http.get(self.url(path)).header("accept", "text/html");
        if let Some(c) = cookie {
            request = request.header("cookie", c);
        }
        let response = request.send().await.expect("GET");
        let status = response.status();
        let headers = response.headers().clone();
        assert_safe_headers(&format!("GET {path}"), &headers);
        (status, headers, response.text().await.expect("body"))
    }

    /// POSTs a form to `path` with `cookie`.
    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        body: String,
    ) -> (StatusCode, HeaderMap, String) {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(c) = cookie {
            request = request.header("cookie", c);
        }
        let response = request.send().await.expect("POST");
        let status = response.status();
        let headers = response.headers().clone();
        assert_safe_headers(&format!("POST {path}"), &headers);
        (status, headers, response.text().await.expect("body"))
    }

    /// Logs in as `name` with `secret`: the session cookie (`name=value`)
    /// and the CSRF token of its pages, or the refusal's status.
    async fn login(&self, name: &str, secret: &str) -> Result<(String, String), StatusCode> {
        let (status, headers, html) = self.get("/login", None).await;
        assert_eq!(status, StatusCode::OK, "{html}");
        let login_cookie = set_cookie(&headers, "backstop_login").expect("login cookie");
        let login_csrf = hidden(&html, "login_csrf");
        let (status, headers, body) = self
            .post(
                "/login",
                Some(&format!("backstop_login={login_cookie}")),
                form(&[
                    ("name", name),
                    ("secret", secret),
                    ("login_csrf", &login_csrf),
                ]),
            )
            .await;
        if status != StatusCode::SEE_OTHER {
            assert!(
                set_cookie(&headers, "backstop_session").is_none(),
                "a refused login set a session: {headers:?}"
            );
            assert!(body.contains("id=\"login-form\""), "{body}");
            return Err(status);
        }
        let session = set_cookie(&headers, "backstop_session").expect("session cookie");
        let raw = headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("backstop_session="))
            .expect("session cookie");
        for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(raw.contains(part), "{raw}");
        }
        assert_eq!(session.len(), 64, "32 random bytes in hex");
        let cookie = format!("backstop_session={session}");
        let (status, _, html) = self.get("/", Some(&cookie)).await;
        assert_eq!(status, StatusCode::OK, "{html}");
        let csrf = hidden(&html, "csrf");
        Ok((cookie, csrf))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).expect("read stderr")
    }
}

use rows::failed_message as message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_login_nothing_is_shown() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let id = console
        .store
        .store(&message("orders", "m-1", b"{\"secret\":\"payload-abc\"}"))
        .await
        .expect("store");
    for path in ["/", "/rows", &format!("/rows/{id}")] {
        // A browser goes to the login page.
        let (status, headers, body) = console.get(path, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}: {body}");
        assert_eq!(headers.get(LOCATION).expect("location"), "/login", "{path}");
        // An API client gets 401, also with a wrong token or session.
        for auth in [None, Some("Bearer wrong"), Some("Basic b3BzOndyb25n")] {
            let mut request = console.http.get(console.url(path));
            if let Some(a) = auth {
                request = request.header("authorization", a);
            }
            let response = request.send().await.expect("GET");
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{path} {auth:?}"
            );
            assert_safe_headers(path, response.headers());
            let body = response.text().await.expect("body");
            assert!(!body.contains("payload-abc"), "{body}");
        }
        let (status, _, _) = console.get(path, Some("backstop_session=00112233")).await;
        assert_eq!(
            status,
            StatusCode::SEE_OTHER,
            "{path} with a made-up session"
        );
    }
    // The bearer token reads.
    let response = console
        .http
        .get(console.url(&format!("/rows/{id}")))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.expect("body").contains("payload-abc"));
    // A POST without a session changes nothing.
    let (status, _, _) = console
        .post(
            &format!("/rows/{id}/action"),
            None,
            form(&[("action", "discard"), ("note", "x")]),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        console.store.get(id).await.expect("row").status,
        Status::Pending
    );
    // The headers are on everything: the stylesheet, a missing page.
    for path in ["/static/console.css", "/login", "/nowhere"] {
        let _ = console.get(path, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_does_not_log_in_and_secrets_stay_out_of_the_log() {
    let console = start(&format!(
        "token = {TOKEN:?}\nuser = \"ops\"\npassword = {PASSWORD:?}"
    ))
    .await;
    // The configured user is not offered as the login name.
    let (_, _, page) = console.get("/login", None).await;
    assert!(
        !page.contains("value=\"ops\""),
        "the login name is pre-filled: {page}"
    );
    assert_eq!(
        console.login("alice", "wrong").await,
        Err(StatusCode::UNAUTHORIZED)
    );
    // After a failure, the next try from this address waits a second.
    let started = std::time::Instant::now();
    assert_eq!(
        console.login("alice", PASSWORD).await,
        Err(StatusCode::UNAUTHORIZED),
        "the password is the user's only"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "a login right after a failed one was not delayed: {:?}",
        started.elapsed()
    );
    assert!(console.login("ops", TOKEN).await.is_ok());
    assert!(console.login("alice", TOKEN).await.is_ok());
    assert!(console.login("ops", PASSWORD).await.is_ok());
    // A secret typed in the name field is not logged either.
    assert!(console.login(PASSWORD, "nope").await.is_err());
    // Without the login form's own token, no login.
    let (status, headers, _) = console
        .post(
            "/login",
            None,
            form(&[("name", "alice"), ("secret", TOKEN)]),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(set_cookie(&headers, "backstop_session").is_none());
    // Basic auth with the user's password reads.
    let response = console
        .http
        .get(console.url("/rows"))
        .basic_auth("ops", Some(PASSWORD))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);

    let stderr = console.stderr();
    assert!(
        stderr.contains("console login"),
        "logins are logged: {stderr}"
    );
    for secret in [TOKEN, PASSWORD] {
        assert!(!stderr.contains(secret), "a secret in the log: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_post_needs_the_csrf_token_and_actions_are_audited() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let id = console
        .store
        .store(&message("orders", "m-1", b"{}"))
        .await
        .expect("store");
    let (cookie, csrf) = console.login("alice", TOKEN).await.expect("login");
    let audit_before = console.store.audit(id).await.expect("audit");
    let action = format!("/rows/{id}/action");
    for (path, body) in [
        (
            action.as_str(),
            form(&[("action", "discard"), ("note", "dup")]),
        ),
        (
            action.as_str(),
            form(&[("action", "discard"), ("note", "dup"), ("csrf", "")]),
        ),
        (
            action.as_str(),
            form(&[("action", "discard"), ("note", "dup"), ("csrf", &csrf[1..])]),
        ),
        (
            action.as_str(),
            form(&[
                ("action", "discard"),
                ("note", "dup"),
                ("csrf", &"0".repeat(64)),
            ]),
        ),
        ("/logout", String::new()),
        (
            &format!("/rows/{id}/edit"),
            form(&[("payload", "x"), ("note", "n")]),
        ),
        (
            "/groups/0123456789abcdef/action",
            form(&[("action", "retry")]),
        ),
        ("/jobs/1/cancel", String::new()),
        ("/dlq/orders.dlq/replay", form(&[("mode", "replay")])),
        (
            "/dlq/orders.dlq/purge",
            form(&[("older_than", "1s"), ("confirm", "yes")]),
        ),
    ] {
        let (status, _, html) = console.post(path, Some(&cookie), body.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} {body}: {html}");
    }
    assert_eq!(
        console.store.get(id).await.expect("row").status,
        Status::Pending
    );
    assert_eq!(console.store.audit(id).await.expect("audit"), audit_before);
    // The session survived the refused logout.
    let (status, _, _) = console.get("/", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);

    // A discard without a note is refused; with one it is audited.
    let (status, _, _) = console
        .post(
            &action,
            Some(&cookie),
            form(&[("action", "discard"), ("note", " "), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, headers, html) = console
        .post(
            &action,
            Some(&cookie),
            form(&[
                ("action", "discard"),
                ("note", "duplicate of order 7"),
                ("csrf", &csrf),
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{html}");
    assert_eq!(
        headers.get(LOCATION).expect("location"),
        &format!("/rows/{id}")
    );
    assert_eq!(
        console.store.get(id).await.expect("row").status,
        Status::Discarded
    );
    let last = console
        .store
        .audit(id)
        .await
        .expect("audit")
        .pop()
        .expect("an entry");
    assert_eq!(
        (
            last.actor.as_str(),
            last.action.as_str(),
            last.note.as_deref()
        ),
        ("console:alice", "discard", Some("duplicate of order 7"))
    );
    let (_, _, page) = console.get(&format!("/rows/{id}"), Some(&cookie)).await;
    let audit = &page[page.find("id=\"row-audit\"").expect("audit table")..];
    assert!(
        audit.contains("console:alice") && audit.contains("duplicate of order 7"),
        "{audit}"
    );

    // Logging out with the token ends the session.
    let (status, _, _) = console
        .post("/logout", Some(&cookie), form(&[("csrf", &csrf)]))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = console.get("/", Some(&cookie)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_row_is_shown_inert() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-evil".into(),
        AMQPValue::LongString(LongString::from(
            b"<script>window.pwned=1</script>\x00\xff".to_vec(),
        )),
    );
    headers.insert(
        "<img src=x onerror=alert(1)>".into(),
        AMQPValue::LongString(LongString::from(b"v".to_vec())),
    );
    let mut hostile = message(
        "orders",
        "m-evil",
        b"<script>window.pwned=1</script>\x00\xff\xfe tail \x1b[31m",
    );
    hostile.headers = serde_json::to_string(&headers).expect("headers json");
    hostile.error = "<img src=x onerror=alert(2)> declined".to_owned();
    hostile.properties = r#"{"content_type":"<script>alert(3)</script>"}"#.to_owned();
    let evil = console.store.store(&hostile).await.expect("store");
    let long = format!("{{\"note\":\"{}<script>\"}}", "A".repeat(1024 * 1024));
    let big = console
        .store
        .store(&message("orders", "m-big", long.as_bytes()))
        .await
        .expect("store");
    let (cookie, _) = console.login("alice", TOKEN).await.expect("login");

    let (status, _, html) = console.get(&format!("/rows/{evil}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(!html.contains("<script"), "raw <script in the page: {html}");
    assert!(!html.contains("<img"), "raw <img in the page: {html}");
    let payload = &html[html.find("id=\"row-payload\"").expect("payload")..];
    assert!(
        payload.contains("&lt;script&gt;window.pwned=1&lt;/script&gt;"),
        "{payload}"
    );
    assert!(payload.contains("Binary, "), "{payload}");
    assert!(
        payload.contains("\u{2400}") && payload.contains("\u{241b}[31m"),
        "{payload}"
    );
    assert!(
        payload.contains("3c 73 63 72 69 70 74 3e"),
        "the hex dump: {payload}"
    );
    assert!(
        !html.contains('\u{0}') && !html.contains('\u{1b}'),
        "raw control characters"
    );
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "the header name is shown"
    );
    assert!(
        html.contains("&lt;img src=x onerror=alert(2)&gt; declined"),
        "the error is shown"
    );

    let (status, _, html) = console.get(&format!("/rows/{big}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.len() < 200 * 1024, "the page is {} bytes", html.len());
    assert!(
        html.contains("only the first 65536 bytes are shown"),
        "{}",
        &html[..2000]
    );
    // Too large to be parsed and pretty-printed: cut first, shown as text.
    assert!(html.contains(&format!("Text, {} bytes", long.len())));

    // The list shows both, escaped.
    let (_, _, list) = console.get("/rows", Some(&cookie)).await;
    assert!(!list.contains("<img") && list.contains("&lt;img src=x onerror=alert(2)&gt;"));
}

/// A request to the console with its own `Host` replaced by `host`.
async fn send_as(
    console: &Console,
    method: reqwest::Method,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (StatusCode, String) {
    let mut request = console
        .http
        .request(method, console.url(path))
        .header("host", host)
        .header("accept", "text/html");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    assert_safe_headers(path, response.headers());
    (status, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_name_is_refused() {
    // Loopback without auth: a name is enough to log in, the case a DNS
    // rebinding page would exploit.
    let console = start("").await;
    let id = console
        .store
        .store(&message("orders", "m-1", b"{}"))
        .await
        .expect("store");
    let port = console.base.rsplit(':').next().expect("a port").to_owned();
    let (cookie, csrf) = console.login("alice", "").await.expect("login");
    let evil = format!("evil.example:{port}");
    for (method, path, body) in [
        (reqwest::Method::GET, "/login", None),
        (reqwest::Method::GET, "/", None),
        (
            reqwest::Method::POST,
            "/login",
            Some(form(&[("name", "mallory"), ("secret", "")])),
        ),
        (
            reqwest::Method::POST,
            &format!("/rows/{id}/action") as &str,
            Some(form(&[
                ("action", "discard"),
                ("note", "rebound"),
                ("csrf", &csrf),
            ])),
        ),
    ] {
        let (status, html) = send_as(
            &console,
            method.clone(),
            path,
            &evil,
            &[("cookie", &cookie)],
            body,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::MISDIRECTED_REQUEST,
            "{method} {path} as {evil}: {html}"
        );
    }
    assert_eq!(
        console.store.get(id).await.expect("row").status,
        Status::Pending
    );
    // Its own names answer, and those of console.allowed_hosts.
    let listed = start("allowed_hosts = [\"console.example.com\"]").await;
    let (cookie, _) = listed.login("alice", "").await.expect("login");
    let port = listed.base.rsplit(':').next().expect("a port").to_owned();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "console.example.com".to_owned(),
        "console.example.com:443".to_owned(),
    ] {
        let (status, html) = send_as(
            &listed,
            reqwest::Method::GET,
            "/",
            &host,
            &[("cookie", &cookie)],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{host}: {html}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_from_another_origin_is_refused() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let id = console
        .store
        .store(&message("orders", "m-1", b"{}"))
        .await
        .expect("store");
    let (cookie, csrf) = console.login("alice", TOKEN).await.expect("login");
    let own = console.base.clone();
    let host = own.trim_start_matches("http://").to_owned();
    let path = format!("/rows/{id}/action");
    let body = || {
        Some(form(&[
            ("action", "discard"),
            ("note", "forged"),
            ("csrf", &csrf),
        ]))
    };
    let other_port = format!(
        "http://127.0.0.1:{}",
        host.rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("port")
            .wrapping_add(1)
    );
    for forged in [
        vec![("origin", other_port.as_str())],
        vec![("origin", "null")],
        vec![("origin", "null"), ("sec-fetch-site", "cross-site")],
        vec![("origin", "http://evil.example")],
        vec![("sec-fetch-site", "same-site")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", own.as_str()), ("sec-fetch-site", "same-site")],
    ] {
        let mut headers = forged.clone();
        headers.push(("cookie", &cookie));
        let (status, html) = send_as(
            &console,
            reqwest::Method::POST,
            &path,
            &host,
            &headers,
            body(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{forged:?}: {html}");
        assert_eq!(
            console.store.get(id).await.expect("row").status,
            Status::Pending,
            "{forged:?}"
        );
    }
    // `Origin: null` with `Sec-Fetch-Site: same-origin` is what Chromium
    // sends with the console's own forms (its no-referrer policy): it
    // passes the origin check and reaches the CSRF check, which refuses
    // this wrong token.
    let (status, html) = send_as(
        &console,
        reqwest::Method::POST,
        &path,
        &host,
        &[
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
            ("cookie", &cookie),
        ],
        Some(form(&[
            ("action", "discard"),
            ("note", "x"),
            ("csrf", "wrong"),
        ])),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains("CSRF token"), "{html}");
    // Its own origin, as a browser sends it, passes.
    let (status, html) = send_as(
        &console,
        reqwest::Method::POST,
        &path,
        &host,
        &[
            ("origin", own.as_str()),
            ("sec-fetch-site", "same-origin"),
            ("cookie", &cookie),
        ],
        body(),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{html}");
    assert_eq!(
        console.store.get(id).await.expect("row").status,
        Status::Discarded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_is_refused_before_login_and_outside_the_edit_form() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let id = console
        .store
        .store(&message("orders", "m-1", b"{}"))
        .await
        .expect("store");
    let big = "a".repeat(1024 * 1024);
    let (status, _, html) = console
        .post("/login", None, form(&[("name", "x"), ("secret", &big)]))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{html}");
    let (cookie, csrf) = console.login("alice", TOKEN).await.expect("login");
    let (status, _, html) = console
        .post(
            &format!("/rows/{id}/action"),
            Some(&cookie),
            // Over the 16 KiB limit, yet small enough that the client has
            // written it all before the console answers 413 and closes (a
            // 1 MiB body raced that close into a broken pipe).
            form(&[
                ("action", "discard"),
                ("note", &"n".repeat(20 * 1024)),
                ("csrf", &csrf),
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{html}");
    assert_eq!(
        console.store.get(id).await.expect("row").status,
        Status::Pending
    );
    // The edit form still takes a large payload.
    let payload = format!("{{\"big\":\"{}\"}}", "b".repeat(1024 * 1024));
    let (status, _, html) = console
        .post(
            &format!("/rows/{id}/edit"),
            Some(&cookie),
            form(&[
                ("payload", &payload),
                ("headers", "{}"),
                ("note", "large edit"),
                ("csrf", &csrf),
            ]),
        )
        .await;
    assert!(status.is_redirection(), "{status}: {html}");
    let versions = console.store.versions(id).await.expect("versions");
    assert_eq!(
        versions.last().map(|v| v.payload.len()),
        Some(payload.len())
    );
}

#[test]
fn off_loopback_without_auth_it_refuses_to_start() {
    let db = temp("db");
    let config = temp("toml");
    std::fs::write(
        &config,
        format!("[store]\nurl = \"sqlite://{}\"\n", db.display()),
    )
    .expect("write the config");
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_backstop"));
        command
            .args(args)
            .env_remove("BACKSTOP_CONSOLE_TOKEN")
            .env_remove("BACKSTOP_CONSOLE_PASSWORD");
        if let Some((k, v)) = env {
            command.env(k, v);
        }
        let output = command.output().expect("run backstop");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let path = config.to_str().expect("utf-8 path");
    let (code, stderr) = run(&["console", "-c", path, "--listen", "0.0.0.0:0"], None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:0 is not a loopback address") && stderr.contains("console.token"),
        "{stderr}"
    );
    let in_file = temp("toml");
    std::fs::write(
        &in_file,
        format!(
            "[store]\nurl = \"sqlite://{}\"\n[console]\nlisten = \"0.0.0.0:0\"\n",
            db.display()
        ),
    )
    .expect("write the config");
    let in_file = in_file.to_str().expect("utf-8 path");
    for command in ["console", "run"] {
        let (code, stderr) = run(&[command, "-c", in_file], None);
        assert_eq!(code, Some(2), "{command}: {stderr}");
        assert!(stderr.contains("key console.listen"), "{command}: {stderr}");
    }
    // `config check` accepts it with the token from the environment, and
    // shows it redacted.
    let (code, stderr) = run(
        &["config", "check", "-c", in_file],
        Some(("BACKSTOP_CONSOLE_TOKEN", TOKEN)),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["config", "check", "-c", in_file])
        .env("BACKSTOP_CONSOLE_TOKEN", TOKEN)
        .output()
        .expect("run");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        shown.contains("[console]") && shown.contains("token = \"***\""),
        "{shown}"
    );
    assert!(!shown.contains(TOKEN), "{shown}");

    // Off loopback, a short token or password is refused.
    for (key, env) in [
        ("console.token", ("BACKSTOP_CONSOLE_TOKEN", "short-token")),
        (
            "console.password",
            ("BACKSTOP_CONSOLE_PASSWORD", "short-pass"),
        ),
    ] {
        let file = temp("toml");
        let user = if key == "console.password" {
            "user = \"ops\"\n"
        } else {
            ""
        };
        std::fs::write(
            &file,
            format!(
                "[store]\nurl = \"sqlite://{}\"\n[console]\nlisten = \"0.0.0.0:0\"\n{user}",
                db.display()
            ),
        )
        .expect("write the config");
        let file = file.to_str().expect("utf-8 path");
        for command in [
            &["console", "-c", file][..],
            &["config", "check", "-c", file],
        ] {
            let (code, stderr) = run(command, Some(env));
            assert_eq!(code, Some(2), "{command:?} {key}: {stderr}");
            assert!(
                stderr.contains(key) && stderr.contains("16 characters"),
                "{command:?}: {stderr}"
            );
            assert!(!stderr.contains(env.1), "a secret in the output: {stderr}");
        }
    }
    // With a long one it starts, and warns that it speaks plain HTTP.
    let stderr_path = temp("stderr");
    let bare = temp("toml");
    std::fs::write(&bare, "[console]\n").expect("write the config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["--log", "info", "console", "--listen", "0.0.0.0:0", "-c"])
        .arg(&bare)
        .env_remove("RUST_LOG")
        .env_remove("BACKSTOP_CONSOLE_PASSWORD")
        .env("BACKSTOP_CONSOLE_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start backstop console");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read.expect("read stdout");
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert!(
        line.starts_with("backstop console: serving on"),
        "{line} {stderr}"
    );
    assert!(
        stderr.contains("plain HTTP") && stderr.contains("TLS proxy"),
        "{stderr}"
    );
}

/// `html` with maud's escapes undone (for attribute values).
fn unescape(html: &str) -> String {
    html.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The text of the element with `id` (up to its first tag end).
fn text_of(html: &str, id: &str) -> String {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {html}"));
    let start = at + html[at..].find('>').expect("tag end") + 1;
    let end = start + html[start..].find('<').expect("next tag");
    html[start..end].to_owned()
}

/// Rows of one group: one queue, one kind, errors that differ only in
/// their numbers.
fn group_rows(queue: &str, n: usize) -> Vec<NewFailedMessage> {
    (0..n)
        .map(|i| {
            let mut m = message(
                queue,
                &format!("{queue}-{i}"),
                format!("{{\"n\":{i}}}").as_bytes(),
            );
            m.error = format!("card {} declined by issuer {}", 4000 + i, i % 7);
            m
        })
        .collect()
}

/// The id of the group of `queue` on the landing page.
fn group_id(home: &str, queue: &str) -> String {
    let table = &home[home.find("id=\"groups\"").expect("groups table")..];
    table
        .split("<tr class=\"group\" data-group-id=\"")
        .skip(1)
        .find(|row| row.contains(queue))
        .and_then(|row| row.split('"').next())
        .unwrap_or_else(|| panic!("no group of {queue} in {table}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_action_runs_as_a_job_and_every_row_is_audited() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let queue = unique("orders");
    console
        .store
        .store_batch(&group_rows(&queue, 1200))
        .await
        .expect("seed");
    let other = unique("refunds");
    console
        .store
        .store_batch(&group_rows(&other, 3000))
        .await
        .expect("seed");
    let (cookie, csrf) = console.login("alice", TOKEN).await.expect("login");
    let (_, _, home) = console.get("/", Some(&cookie)).await;
    let id = group_id(&home, &queue);
    let (status, _, page) = console.get(&format!("/groups/{id}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Act on all 1200 rows"), "{page}");
    assert!(page.contains("id=\"group-action\""));

    let action = format!("/groups/{id}/action");
    let (status, _, _) = console
        .post(
            &action,
            Some(&cookie),
            form(&[("action", "discard"), ("note", "x")]),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = console
        .post(
            &action,
            Some(&cookie),
            form(&[("action", "discard"), ("note", ""), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a discard needs a note");
    let (status, _, _) = console
        .post(
            &action,
            Some(&cookie),
            form(&[("action", "retry"), ("note", " "), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a retry needs a note too");
    assert!(
        !console
            .store
            .count_by_status()
            .await
            .expect("counts")
            .iter()
            .any(|(s, _)| *s == Status::Discarded)
    );

    let (status, headers, body) = console
        .post(
            &action,
            Some(&cookie),
            form(&[
                ("action", "discard"),
                ("note", "test orders"),
                ("csrf", &csrf),
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let job = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_owned();
    assert!(job.starts_with("/jobs/"), "{job}");
    let page = wait_for_job(&console, &cookie, &job).await;
    assert_eq!(text_of(&page, "job-status"), "finished");
    assert_eq!(text_of(&page, "job-done"), "1200");
    assert_eq!(text_of(&page, "job-total"), "1200");
    // The job's start and end are in the console's audit, with the actor.
    let start = audited(&console, "group_job_start", &format!("group {id}")).await;
    assert!(start.contains("note=test orders"), "{start}");
    audited(&console, "group_job_end", "").await;
    let rows = console
        .store
        .list(&backstop::store::ListFilter {
            queue: Some(queue.clone()),
            limit: Some(5000),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(rows.len(), 1200);
    assert!(rows.iter().all(|r| r.status == Status::Discarded));
    let last = console
        .store
        .audit(rows[17].id)
        .await
        .expect("audit")
        .pop()
        .expect("entry");
    assert_eq!(
        (
            last.actor.as_str(),
            last.action.as_str(),
            last.note.as_deref()
        ),
        ("console:alice", "discard", Some("test orders"))
    );
    // The group is gone from the landing page; the other one is still there.
    let (_, _, home) = console.get("/", Some(&cookie)).await;
    assert!(!home.contains(&format!("data-group-id=\"{id}\"")));

    // Cancelling stops between whole batches: the rows discarded are
    // exactly those the job counts, each audited.
    let other_id = group_id(&home, &other);
    let (status, headers, _) = console
        .post(
            &format!("/groups/{other_id}/action"),
            Some(&cookie),
            form(&[("action", "discard"), ("note", "stop me"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let job = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_owned();
    let (status, _, _) = console
        .post(&format!("{job}/cancel"), Some(&cookie), String::new())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "cancel needs the CSRF token");
    let page = cancel_and_wait(&console, &cookie, &csrf, &job).await;
    audited(&console, "group_job_cancel", "").await;
    let done: usize = text_of(&page, "job-done").parse().expect("a count");
    let status = text_of(&page, "job-status");
    assert!(
        status == "cancelled" || (status == "finished" && done == 3000),
        "{status} {done}"
    );
    let rows = console
        .store
        .list(&backstop::store::ListFilter {
            queue: Some(other.clone()),
            limit: Some(5000),
            ..Default::default()
        })
        .await
        .expect("list");
    let discarded = rows
        .iter()
        .filter(|r| r.status == Status::Discarded)
        .count();
    assert_eq!(discarded, done, "{status}");
    assert_eq!(done % 500, 0, "whole batches of 500 rows");
}

/// The detail of the newest `action` in the console's audit, which must be
/// alice's, on `target` when it is not empty.
async fn audited(console: &Console, action: &str, target: &str) -> String {
    let actions = console
        .store
        .console_actions(20)
        .await
        .expect("console audit");
    let entry = actions
        .iter()
        .find(|a| a.action == action)
        .unwrap_or_else(|| panic!("no {action} in the console audit: {actions:?}"));
    assert_eq!(entry.actor, "console:alice", "{entry:?}");
    if !target.is_empty() {
        assert_eq!(entry.target, target, "{entry:?}");
    }
    entry.detail.clone().unwrap_or_default()
}

/// Cancels `job` (with the CSRF token) and waits for its end: its page.
async fn cancel_and_wait(console: &Console, cookie: &str, csrf: &str, job: &str) -> String {
    let (status, _, _) = console
        .post(
            &format!("{job}/cancel"),
            Some(cookie),
            form(&[("csrf", csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    wait_for_job(console, cookie, job).await
}

/// Reloads the job page until it no longer refreshes itself (60 s at most).
async fn wait_for_job(console: &Console, cookie: &str, job: &str) -> String {
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    backstop_testkit::wait_until("the job to end", std::time::Duration::from_secs(60), || {
        let request = console
            .http
            .get(console.url(job))
            .header("cookie", cookie)
            .send();
        let last = last.clone();
        async move {
            let page = request.await.expect("GET").text().await.expect("body");
            let running = page.contains("http-equiv=\"refresh\"");
            *last.lock().expect("lock") = page;
            !running
        }
    })
    .await;
    last.lock().expect("lock").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_needs_a_note_keeps_the_original_and_is_audited() {
    let console = start(&format!("token = {TOKEN:?}")).await;
    let mut original = message("orders", "m-edit", br#"{"amount":1}"#);
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::ShortString("acme".into()));
    original.headers = serde_json::to_string(&headers).expect("json");
    let id = console.store.store(&original).await.expect("store");
    let (cookie, csrf) = console.login("alice", TOKEN).await.expect("login");
    let (status, _, page) = console
        .get(&format!("/rows/{id}/edit"), Some(&cookie))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let shown = unescape(&hidden(&page, "headers_shown"));
    assert!(shown.contains("\"x-tenant\": \"acme\""), "{shown}");
    let path = format!("/rows/{id}/edit");
    let edit = |note: &str, csrf: &str| {
        form(&[
            ("payload", "{\"amount\":2}\r\n"),
            ("encoding", "text"),
            ("headers", &shown),
            ("headers_shown", &shown),
            ("note", note),
            ("retry", "1"),
            ("csrf", csrf),
        ])
    };
    let (status, _, _) = console.post(&path, Some(&cookie), edit("fix", "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = console.post(&path, Some(&cookie), edit("  ", &csrf)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(console.store.versions(id).await.expect("versions").len(), 1);

    let (status, _, body) = console
        .post(&path, Some(&cookie), edit("amount was wrong", &csrf))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let row = console.store.get(id).await.expect("row");
    assert_eq!(
        (row.version, row.payload.as_slice()),
        (1, &b"{\"amount\":2}\n"[..])
    );
    assert_eq!(
        row.headers, original.headers,
        "unchanged headers are kept exactly"
    );
    let versions = console.store.versions(id).await.expect("versions");
    assert_eq!(versions[0].payload, br#"{"amount":1}"#);
    let audit = console.store.audit(id).await.expect("audit");
    let edit_entry = audit
        .iter()
        .find(|e| e.action == "edit")
        .expect("an edit entry");
    assert_eq!(edit_entry.actor, "console:alice");
    let note = edit_entry.note.as_deref().unwrap_or("");
    assert!(
        note.starts_with("amount was wrong") && note.contains("+{\"amount\":2}"),
        "{note}"
    );
    let (_, _, page) = console.get(&format!("/rows/{id}"), Some(&cookie)).await;
    assert!(page.contains("(edited: version 1)") && page.contains("id=\"row-versions\""));
}

/// Waits until `queue` holds `n` ready messages and none unacked.
async fn settled(queue: &str, n: u64) {
    let q = queue.to_owned();
    backstop_testkit::wait_until(
        &format!("{queue} to hold {n} ready, none unacked"),
        std::time::Duration::from_secs(10),
        move || {
            let q = q.clone();
            async move { backstop_testkit::queue_is(&q, move |c| c.ready == n && c.unacked == 0).await }
        },
    )
    .await;
}

/// Publishes to `dlq` one message with Backstop's failure headers, failed
/// in `queue` with `error`, dead-lettered `age_ms` ago, with a confirm.
async fn park(
    channel: &lapin::Channel,
    dlq: &str,
    queue: &str,
    id: &str,
    error: &str,
    age_ms: u64,
) {
    use backstop::retry;
    let mut headers = FieldTable::default();
    for (k, v) in [
        (retry::ORIGINAL_QUEUE_HEADER, queue),
        (retry::ORIGINAL_EXCHANGE_HEADER, ""),
        (retry::ORIGINAL_ROUTING_KEY_HEADER, queue),
        (retry::ERROR_HEADER, error),
        (retry::ERROR_KIND_HEADER, "permanent"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    headers.insert(
        retry::LAST_FAILURE_HEADER.into(),
        AMQPValue::LongLongInt((now_ms() - age_ms) as i64),
    );
    let body = format!("{{\"id\":\"{id}\",\"html\":\"<script>window.pwned=1</script>\"}}");
    let confirm = channel
        .basic_publish(
            "".into(),
            dlq.into(),
            lapin::options::BasicPublishOptions::default(),
            body.as_bytes(),
            lapin::BasicProperties::default()
                .with_message_id(id.into())
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
}

/// Publishes to `dlq` `n` messages of 1 MiB (ids `m-0`, `m-1`, ...) with
/// `headers`, each with a confirm.
async fn park_large(channel: &lapin::Channel, dlq: &str, n: u64, headers: FieldTable) {
    let body = vec![b'x'; 1024 * 1024];
    for i in 0..n {
        let confirm = channel
            .basic_publish(
                "".into(),
                dlq.into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default()
                    .with_message_id(format!("m-{i}").into())
                    .with_headers(headers.clone()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
}

/// The message ids of the `tr.dlq-message` rows of table `id`, in order.
fn dlq_ids(html: &str, id: &str) -> Vec<String> {
    let Some(at) = html.find(&format!("id=\"{id}\"")) else {
        panic!("no #{id} in {html}");
    };
    let table = &html[at..at + html[at..].find("</tbody></table>").expect("table end")];
    table
        .split("<tr class=\"dlq-message\"")
        .skip(1)
        .map(|row| {
            let cells: Vec<&str> = row.split("<td").collect();
            let cell = cells.get(2).expect("a message id cell");
            cell[cell.find('>').expect(">") + 1..cell.find('<').expect("<")].to_owned()
        })
        .collect()
}

/// A consumer's queue named after `prefix` and its DLQ, declared, and a
/// confirm channel to park messages on.
async fn dlq_setup(prefix: &str) -> (lapin::Connection, lapin::Channel, String, String) {
    let queue = unique(prefix);
    let dlq = backstop::retry::RetryPolicy::dead_letter_queue(&queue);
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    backstop::topology::Topology::new()
        .queue(backstop::topology::Queue::classic(&queue))
        .queue(backstop::topology::Queue::classic(&dlq))
        .apply(&channel)
        .await
        .expect("declare");
    (connection, channel, queue, dlq)
}

/// The console of a consumer of `queue` (so its DLQ is reachable), logged
/// in as alice: the console, the session cookie and its CSRF token.
async fn dlq_console(queue: &str) -> (Console, String, String) {
    let sections = format!(
        "[broker]\nuri = {:?}\n\n[[consumer]]\nqueue = {queue:?}\nhandler.http.url = \"http://127.0.0.1:9/\"\n",
        backstop_testkit::amqp_url()
    );
    let console = start_with(&sections, &format!("token = {TOKEN:?}")).await;
    let (cookie, csrf) = console.login("alice", TOKEN).await.expect("login");
    (console, cookie, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_peek_replays_only_after_a_dry_run_and_purges_after_a_confirm() {
    let (connection, channel, queue, dlq) = dlq_setup("console-dlq").await;
    park(&channel, &dlq, &queue, "a", "timeout after 30s", 0).await;
    park(&channel, &dlq, &queue, "b", "card declined", 2 * 3_600_000).await;
    park(&channel, &dlq, &queue, "c", "timeout after 5s", 0).await;
    let (console, cookie, csrf) = dlq_console(&queue).await;

    let (status, _, page) = console.get("/dlq", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(&format!("data-queue=\"{dlq}\"")), "{page}");
    let (status, _, page) = console.get(&format!("/dlq/{dlq}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("Peeked with requeue, in queue order"),
        "{page}"
    );
    assert_eq!(dlq_ids(&page, "dlq-messages"), ["a", "b", "c"]);
    assert!(!page.contains("<script"), "raw <script in the page");
    settled(&dlq, 3).await;
    let (status, _, _) = console.get("/dlq/not-configured.dlq", Some(&cookie)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // No replay without its dry run.
    let replay = format!("/dlq/{dlq}/replay");
    let filters = [("error_contains", "timeout"), ("csrf", csrf.as_str())];
    let mut real = filters.to_vec();
    real.push(("mode", "replay"));
    let (status, _, _) = console.post(&replay, Some(&cookie), form(&real)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    settled(&dlq, 3).await;

    let mut dry = filters.to_vec();
    dry.push(("mode", "dry_run"));
    let (status, _, page) = console.post(&replay, Some(&cookie), form(&dry)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(text_of(&page, "replay-would-move"), "2");
    assert_eq!(dlq_ids(&page, "replay-would-move-list"), ["a", "c"]);
    assert!(page.contains("id=\"replay-submit\""), "{page}");
    settled(&dlq, 3).await;
    // Other filters than the dry run's are refused (and leave it usable).
    let (status, _, _) = console
        .post(
            &replay,
            Some(&cookie),
            replay_confirm(&page, &[("error_contains", "declined")]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    settled(&dlq, 3).await;
    // The dry run's own form: its filters, times and count.
    let (status, headers, page) = console
        .post(
            &replay,
            Some(&cookie),
            replay_confirm(&page, &[("error_contains", "timeout")]),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the replay runs as a job: {page}"
    );
    let job = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_owned();
    assert!(job.starts_with("/jobs/"), "{job}");
    let page = wait_for_job(&console, &cookie, &job).await;
    assert_eq!(text_of(&page, "job-status"), "finished", "{page}");
    assert_eq!(text_of(&page, "job-done"), "2");
    assert_eq!(text_of(&page, "replay-moved"), "2");
    settled(&queue, 2).await;
    settled(&dlq, 1).await;
    // Audited with the actor, and shown on /dlq.
    let start = audited(&console, "dlq_replay_start", &dlq).await;
    assert!(start.contains("timeout"), "{start}");
    let end = audited(&console, "dlq_replay_end", "").await;
    assert!(end.contains("moved=2"), "{end}");
    let (_, _, page) = console.get("/dlq", Some(&cookie)).await;
    let audit = &page[page.find("id=\"console-audit\"").expect("#console-audit")..];
    assert!(
        audit.contains("console:alice") && audit.contains("dlq_replay_start"),
        "{page}"
    );

    // Purge: the count first, nothing removed; then the confirm.
    let purge = format!("/dlq/{dlq}/purge");
    let (status, _, page) = console
        .post(
            &purge,
            Some(&cookie),
            form(&[("older_than", "1h"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("id=\"purge-confirm\""), "{page}");
    assert!(page.contains("<strong>1 message(s)</strong>"), "{page}");
    settled(&dlq, 1).await;
    // Not without the count's cutoff.
    let (status, _, _) = console
        .post(
            &purge,
            Some(&cookie),
            form(&[("older_than", "1h"), ("confirm", "yes"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let confirm = fields_form(&hidden_fields(&page, "purge-confirm-form"));
    let (status, _, page) = console.post(&purge, Some(&cookie), confirm.clone()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("1 message(s) removed"), "{page}");
    settled(&dlq, 0).await;
    audited(&console, "dlq_purge", &dlq).await;
    backstop_testkit::delete_queue(&connection, &queue).await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
}

/// `backstop run` with a `[console]` section serves the console too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backstop_run_serves_the_console_of_its_config() {
    let db = temp("db");
    let config = temp("toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nuri = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{}\"\n\
             [console]\nlisten = \"127.0.0.1:0\"\ntoken = {TOKEN:?}\n",
            backstop_testkit::amqp_url(),
            db.display()
        ),
    )
    .expect("write the config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start backstop run");
    let stdout = child.stdout.take().expect("stdout");
    let base = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().find_map(|line| {
            line.expect("read stdout")
                .strip_prefix("backstop run: review console on ")
                .map(|b| b.trim_end_matches('/').to_owned())
        })
    })
    .await
    .expect("join");
    let Some(base) = base else {
        let _ = child.kill();
        panic!("backstop run did not say where the console is");
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .get(format!("{base}/login"))
        .send()
        .await
        .expect("GET /login");
    let status = response.status();
    assert_safe_headers("run: /login", response.headers());
    let html = response.text().await.expect("body");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("id=\"login-form\""), "{html}");
}

/// The TCP connections of process `pid` to the broker's port (from `ss`).
fn broker_connections_of(pid: u32) -> usize {
    let port = backstop_testkit::broker_addr().port();
    let output = Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .output()
        .expect("run ss");
    assert!(output.status.success(), "ss failed: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")) && l.contains(&format!(":{port} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_mid_peek_leaves_nothing_unacked_nor_connected() {
    use tokio::io::AsyncWriteExt;
    const MESSAGES: u64 = 50;
    let (connection, channel, queue, dlq) = dlq_setup("console-hangup").await;
    // Large bodies, so that the peek takes long enough to hang up during it.
    park_large(&channel, &dlq, MESSAGES, FieldTable::default()).await;
    settled(&dlq, MESSAGES).await;
    let (console, cookie, _) = dlq_console(&queue).await;
    let pid = console.child.id();
    assert_eq!(broker_connections_of(pid), 0, "no DLQ connection before");

    // A raw client asks for the peek and hangs up as soon as the console
    // has started taking messages (the queue's ready count drops).
    let address = console.base.trim_start_matches("http://").to_owned();
    let mut client = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect to the console");
    client
        .write_all(
            format!(
                "GET /dlq/{dlq} HTTP/1.1\r\nHost: {address}\r\nCookie: {cookie}\r\nAccept: text/html\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send the request");
    let probe = connection.create_channel().await.expect("channel");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let declared = probe
            .queue_declare(
                dlq.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        if u64::from(declared.message_count()) < MESSAGES {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the peek never started taking messages"
        );
    }
    drop(client);

    // Everything goes back, and the console's broker connection closes.
    let q = dlq.clone();
    backstop_testkit::wait_until(
        &format!("{dlq} to hold {MESSAGES} ready, none unacked, after the hang-up"),
        std::time::Duration::from_secs(20),
        move || {
            let q = q.clone();
            async move {
                backstop_testkit::queue_is(&q, |c| c.ready == MESSAGES && c.unacked == 0).await
            }
        },
    )
    .await;
    backstop_testkit::wait_until(
        "the console's DLQ connection to close",
        std::time::Duration::from_secs(20),
        move || async move { broker_connections_of(pid) == 0 },
    )
    .await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
    backstop_testkit::delete_queue(&connection, &queue).await;
}

/// The hidden fields of form `id` in `html`, as (name, value), unescaped.
fn hidden_fields(html: &str, id: &str) -> Vec<(String, String)> {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no form #{id} in {html}"));
    let form = &html[at..at + html[at..].find("</form>").expect("end of form")];
    form.split("<input")
        .skip(1)
        .filter(|input| input.contains("type=\"hidden\""))
        .map(|input| {
            let attr = |name: &str| {
                let start = input
                    .find(&format!(" {name}=\""))
                    .unwrap_or_else(|| panic!("no {name} in {input}"))
                    + name.len()
                    + 3;
                let end = input[start..].find('"').expect("end of attribute");
                unescape(&input[start..start + end])
            };
            (attr("name"), attr("value"))
        })
        .collect()
}

/// `fields` as a form body.
fn fields_form(fields: &[(String, String)]) -> String {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    form(&pairs)
}

/// The message ids left in `queue`, in order (a peek with a plain client:
/// basic.get without ack, then the channel closes and they are requeued).
async fn ids_in(connection: &lapin::Connection, queue: &str) -> Vec<String> {
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic.get")
    {
        ids.push(
            message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        );
    }
    channel.close(200, "peeked".into()).await.expect("close");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_purge_removes_only_what_its_dry_run_counted() {
    let (connection, channel, queue, dlq) = dlq_setup("console-purge").await;
    park(&channel, &dlq, &queue, "old-1", "x", 3_600_000).await;
    park(&channel, &dlq, &queue, "old-2", "x", 3_600_000).await;
    park(&channel, &dlq, &queue, "new", "x", 0).await;
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let purge = format!("/dlq/{dlq}/purge");
    let dry_run_at = now_ms();
    let (status, _, page) = console
        .post(
            &purge,
            Some(&cookie),
            form(&[("older_than", "2s"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("<strong>2 message(s)</strong>"), "{page}");
    settled(&dlq, 3).await;
    // After the dry run: one dead-lettered just before it (newer than its
    // cutoff, older than "2s" once 2 s have passed), and one long ago
    // (older than the cutoff, but not counted by the dry run).
    park(
        &channel,
        &dlq,
        &queue,
        "late-but-new",
        "x",
        now_ms() - (dry_run_at - 500),
    )
    .await;
    park(&channel, &dlq, &queue, "late-and-old", "x", 7_200_000).await;
    settled(&dlq, 5).await;
    backstop_testkit::wait_until(
        "3 s to pass since the dry run",
        std::time::Duration::from_secs(10),
        move || async move { now_ms() > dry_run_at + 3_000 },
    )
    .await;
    let confirm = fields_form(&hidden_fields(&page, "purge-confirm-form"));
    let (status, _, done) = console.post(&purge, Some(&cookie), confirm.clone()).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert!(done.contains("2 message(s) removed"), "{done}");
    settled(&dlq, 3).await;
    assert_eq!(
        ids_in(&connection, &dlq).await,
        ["new", "late-but-new", "late-and-old"]
    );
    backstop_testkit::delete_queue(&connection, &queue).await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
}

/// A console replay is a job: cancelled, it stops before its next publish;
/// what it moved is in the queue, the rest back in the DLQ, nothing unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_replay_runs_as_a_job_and_stops_when_cancelled() {
    let (connection, channel, queue, dlq) = dlq_setup("console-dlq-cancel").await;
    for n in 0..20 {
        park(&channel, &dlq, &queue, &format!("m{n}"), "timeout", 0).await;
    }
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let replay = format!("/dlq/{dlq}/replay");
    // One message a second: 20 s for all of them.
    let filters = [("rate", "1"), ("csrf", csrf.as_str())];
    let mut dry = filters.to_vec();
    dry.push(("mode", "dry_run"));
    let (status, _, page) = console.post(&replay, Some(&cookie), form(&dry)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (status, headers, page) = console
        .post(
            &replay,
            Some(&cookie),
            replay_confirm(&page, &[("rate", "1")]),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let job = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_owned();
    let (status, _, page) = console.get(&job, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("id=\"job-cancel\""), "{page}");
    let page = cancel_and_wait(&console, &cookie, &csrf, &job).await;
    assert_eq!(text_of(&page, "job-status"), "cancelled", "{page}");
    let moved: u64 = text_of(&page, "job-done").parse().expect("a count");
    assert!(moved < 20, "stopped before the end: {moved} moved");
    settled(&queue, moved).await;
    settled(&dlq, 20 - moved).await;
    audited(&console, "dlq_replay_cancel", "").await;
    let end = audited(&console, "dlq_replay_end", "").await;
    assert!(
        end.ends_with("cancelled=true cancelled_by=console:alice"),
        "{end}"
    );
    backstop_testkit::delete_queue(&connection, &queue).await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
}

/// A dry run of many messages lists the first 100 (the count stays
/// exact), and a large body is kept and shown cut at 64 KiB, in the dry run
/// as in the peek.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lists_at_most_100_and_cuts_large_bodies() {
    const MESSAGES: usize = 120;
    let (connection, channel, queue, dlq) = dlq_setup("console-dlq-cap").await;
    // The first message has a 1 MiB JSON body.
    let mut headers = FieldTable::default();
    headers.insert(
        backstop::retry::ORIGINAL_QUEUE_HEADER.into(),
        AMQPValue::LongString(queue.as_str().into()),
    );
    let big = format!("{{\"big\":\"{}\"}}", "z".repeat(1024 * 1024));
    channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            big.as_bytes(),
            lapin::BasicProperties::default()
                .with_message_id("big".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    for n in 1..MESSAGES {
        park(&channel, &dlq, &queue, &format!("m{n}"), "timeout", 0).await;
    }
    settled(&dlq, MESSAGES as u64).await;
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let (status, _, page) = console
        .post(
            &format!("/dlq/{dlq}/replay"),
            Some(&cookie),
            form(&[("mode", "dry_run"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text_of(&page, "replay-would-move"), MESSAGES.to_string());
    assert_eq!(dlq_ids(&page, "replay-would-move-list").len(), 100);
    assert!(
        page.len() < 512 * 1024,
        "the dry run page holds the whole 1 MiB body: {} bytes",
        page.len()
    );
    assert!(page.contains("(the first 65536 kept)"), "not said cut");
    let (status, _, page) = console.get(&format!("/dlq/{dlq}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.len() < 512 * 1024,
        "the peek page holds the whole 1 MiB body: {} bytes",
        page.len()
    );
    settled(&dlq, MESSAGES as u64).await;
    backstop_testkit::delete_queue(&connection, &queue).await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
}

/// The fields a replay confirmed from `page` (a dry run's) sends: its
/// hidden fields and `typed`, the filters as typed.
fn replay_confirm(page: &str, typed: &[(&str, &str)]) -> String {
    let mut fields = hidden_fields(page, "replay-form");
    fields.extend(
        typed
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    fields.push(("mode".to_owned(), "replay".to_owned()));
    fields_form(&fields)
}

/// The job a POST redirected to.
fn job_of(status: StatusCode, headers: &HeaderMap, page: &str) -> String {
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_owned()
}

/// A replay confirmed after its dry run selects what the dry run did: the
/// times as the dry run resolved them ("since 5s" is 5 s before the dry
/// run, not before the confirm), and at most the dry run's count, so
/// matching messages dead-lettered since stay in the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_replay_moves_only_what_its_dry_run_selected() {
    let (connection, channel, queue, dlq) = dlq_setup("console-replay-bound").await;
    // At the head: older than the dry run's "since 5s", never selected.
    park(&channel, &dlq, &queue, "old", "timeout", 3_600_000).await;
    for id in ["a", "b", "c"] {
        park(&channel, &dlq, &queue, id, "timeout", 0).await;
    }
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let replay = format!("/dlq/{dlq}/replay");
    let typed = [("error_contains", "timeout"), ("since", "5s")];
    let dry_run_at = now_ms();
    let mut dry = typed.to_vec();
    dry.extend([("mode", "dry_run"), ("csrf", csrf.as_str())]);
    let (status, _, page) = console.post(&replay, Some(&cookie), form(&dry)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(text_of(&page, "replay-would-move"), "3");
    // After the dry run: two more that match its filters.
    park(&channel, &dlq, &queue, "d", "timeout", 0).await;
    park(&channel, &dlq, &queue, "e", "timeout", 0).await;
    settled(&dlq, 6).await;
    // Long enough that "5s" resolved again would leave out every message.
    backstop_testkit::wait_until(
        "6 s to pass since the dry run",
        std::time::Duration::from_secs(15),
        move || async move { now_ms() > dry_run_at + 6_000 },
    )
    .await;
    let (status, headers, page) = console
        .post(&replay, Some(&cookie), replay_confirm(&page, &typed))
        .await;
    let job = job_of(status, &headers, &page);
    let page = wait_for_job(&console, &cookie, &job).await;
    assert_eq!(text_of(&page, "job-status"), "finished", "{page}");
    assert_eq!(text_of(&page, "replay-moved"), "3", "{page}");
    settled(&queue, 3).await;
    assert_eq!(ids_in(&connection, &dlq).await, ["old", "d", "e"]);
    backstop_testkit::delete_queue(&connection, &queue).await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
}

/// A dry run confirms one replay only: the same confirm sent again (a
/// double click, the Back button) is refused and moves nothing. And the
/// replay never selects a message dead-lettered after its dry run, even
/// when the dry run's count leaves room (one of its messages went away
/// meanwhile): a re-parked copy cannot be replayed again that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_confirms_one_replay_of_what_was_parked_before_it() {
    let (connection, channel, queue, dlq) = dlq_setup("console-replay-once").await;
    for id in ["a", "b"] {
        park(&channel, &dlq, &queue, id, "timeout", 1_000).await;
    }
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let replay = format!("/dlq/{dlq}/replay");
    let typed = [("error_contains", "timeout")];
    let mut dry = typed.to_vec();
    dry.extend([("mode", "dry_run"), ("csrf", csrf.as_str())]);
    let (status, _, page) = console.post(&replay, Some(&cookie), form(&dry)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(text_of(&page, "replay-would-move"), "2");
    // After the dry run: "a" leaves the DLQ another way, "late" is parked.
    let taker = connection.create_channel().await.expect("channel");
    let taken = taker
        .basic_get(
            dlq.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
        .expect("a message");
    assert_eq!(
        taken
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|i| i.as_str()),
        Some("a")
    );
    park(&channel, &dlq, &queue, "late", "timeout", 0).await;
    settled(&dlq, 2).await;
    let confirm = replay_confirm(&page, &typed);
    let (status, headers, page) = console.post(&replay, Some(&cookie), confirm.clone()).await;
    let job = job_of(status, &headers, &page);
    let page = wait_for_job(&console, &cookie, &job).await;
    assert_eq!(text_of(&page, "job-status"), "finished", "{page}");
    assert_eq!(text_of(&page, "replay-moved"), "1", "{page}");
    assert!(
        page.contains("at_most=2"),
        "the bounds on the job page: {page}"
    );
    let start = audited(&console, "dlq_replay_start", &dlq).await;
    for bound in [
        "since_ms=-",
        "until_ms=-",
        "parked_before_ms=",
        "at_most=2",
        "rate=-",
    ] {
        assert!(start.contains(bound), "{bound} not audited: {start}");
    }
    // The same confirm again: refused, nothing more moves.
    let (status, _, again) = console.post(&replay, Some(&cookie), confirm).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(again.contains("already used"), "{again}");
    settled(&queue, 1).await;
    settled(&dlq, 1).await;
    assert_eq!(ids_in(&connection, &dlq).await, ["late"]);
    backstop_testkit::delete_queue(&connection, &queue).await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
}

/// The number after `name=` in an audit detail.
fn count_in(detail: &str, name: &str) -> u64 {
    let at = detail
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name}= in {detail:?}"))
        + name.len()
        + 1;
    detail[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count after {name}= in {detail:?}"))
}

/// A console replay that fails partway (its DLQ is deleted under it: the
/// next basic.get is refused and closes the channel) audits how many it
/// had moved, with the error, not just the error: those are gone from the
/// DLQ for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_partway_audits_what_it_moved() {
    let (connection, channel, queue, dlq) = dlq_setup("console-replay-fault").await;
    for n in 0..20 {
        park(&channel, &dlq, &queue, &format!("m{n}"), "timeout", 0).await;
    }
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let replay = format!("/dlq/{dlq}/replay");
    // Two a second: 10 s for all of them.
    let typed = [("rate", "2")];
    let (status, _, page) = console
        .post(
            &replay,
            Some(&cookie),
            form(&[("rate", "2"), ("mode", "dry_run"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (status, headers, page) = console
        .post(&replay, Some(&cookie), replay_confirm(&page, &typed))
        .await;
    let job = job_of(status, &headers, &page);
    let probe = connection.create_channel().await.expect("channel");
    let target = queue.clone();
    backstop_testkit::wait_until(
        "2 messages to be replayed",
        std::time::Duration::from_secs(20),
        move || {
            let (probe, target) = (probe.clone(), target.clone());
            async move {
                backstop_testkit::ready_count(&probe, &target)
                    .await
                    .expect("passive declare")
                    >= 2
            }
        },
    )
    .await;
    backstop_testkit::delete_queue(&connection, &dlq).await;
    let page = wait_for_job(&console, &cookie, &job).await;
    assert_eq!(text_of(&page, "job-status"), "failed", "{page}");
    let end = audited(&console, "dlq_replay_end", "").await;
    assert!(end.starts_with("failed after moved="), "{end}");
    let moved = count_in(&end, "moved");
    assert!((2..20).contains(&moved), "{end}");
    let probe = connection.create_channel().await.expect("channel");
    let replayed = u64::from(
        backstop_testkit::ready_count(&probe, &queue)
            .await
            .expect("passive declare"),
    );
    // One more when the copy in hand was confirmed and its ack then failed
    // (the DLQ was gone): a duplicate, never a loss.
    assert!(
        replayed == moved || replayed == moved + 1,
        "{replayed} in the queue, {end}"
    );
    backstop_testkit::delete_queue(&connection, &queue).await;
}

/// A confirmed purge that fails partway (its DLQ deleted under it) answers
/// with the count it had removed, and audits it with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_that_fails_partway_audits_what_it_removed() {
    const MESSAGES: u64 = 50;
    let (connection, channel, queue, dlq) = dlq_setup("console-purge-fault").await;
    // Large bodies dead-lettered 2 h ago, so that the purge takes long
    // enough to delete its queue during it.
    let mut headers = FieldTable::default();
    headers.insert(
        backstop::retry::LAST_FAILURE_HEADER.into(),
        AMQPValue::LongLongInt((now_ms() - 7_200_000) as i64),
    );
    park_large(&channel, &dlq, MESSAGES, headers).await;
    settled(&dlq, MESSAGES).await;
    let (console, cookie, csrf) = dlq_console(&queue).await;
    let purge = format!("/dlq/{dlq}/purge");
    let (status, _, page) = console
        .post(
            &purge,
            Some(&cookie),
            form(&[("older_than", "1h"), ("csrf", &csrf)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let confirm = fields_form(&hidden_fields(&page, "purge-confirm-form"));
    // The DLQ is deleted as soon as the purge has started removing.
    let probe = connection.create_channel().await.expect("channel");
    let delete = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while u64::from(
            backstop_testkit::ready_count(&probe, &dlq)
                .await
                .expect("passive declare"),
        ) == MESSAGES
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the purge never started removing"
            );
        }
        backstop_testkit::delete_queue(&connection, &dlq).await;
    };
    let ((status, _, page), ()) =
        tokio::join!(console.post(&purge, Some(&cookie), confirm.clone()), delete);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{page}");
    let end = audited(&console, "dlq_purge_end", &dlq).await;
    assert!(end.starts_with("failed after purged="), "{end}");
    let purged = count_in(&end, "purged");
    assert!((1..MESSAGES).contains(&purged), "{end}");
    assert!(
        page.contains(&format!(
            "{purged} message(s) had been removed before the error"
        )),
        "{page}"
    );
    backstop_testkit::delete_queue(&connection, &queue).await;
}
