//! `backstop console`: the review console, a web UI over the compensation
//! store and the dead-letter queues of the configured consumers. Also
//! served by `backstop run` when the file has a `[console]` section.
//!
//! Security rules:
//! - It refuses to start on a non-loopback address without a token or a
//!   user and password (exit 2).
//! - Every page needs a login (a session cookie: random, HttpOnly,
//!   SameSite=Strict), or `Authorization: Bearer TOKEN` for API clients;
//!   basic auth reads only.
//! - Every state change is a POST carrying the session's CSRF token,
//!   compared in constant time; a POST without it changes nothing (403).
//! - Every response carries a strict Content-Security-Policy (no inline
//!   script or style), `X-Frame-Options: DENY`, `nosniff`, no referrer and
//!   `Cache-Control: no-store`.
//! - The audit actor of every action is `console:<name>` of the login.
//! - Secrets are never logged; payloads and headers are shown inert.
//! - A request whose `Host` is not the console's own address,
//!   `localhost:<port>`, `[::1]:<port>` or a name of `console.allowed_hosts`
//!   is refused with 421 (DNS rebinding: a hostile page whose name points
//!   at 127.0.0.1 is not the console's origin).
//! - A POST whose `Origin` is another origin, or whose `Sec-Fetch-Site` is
//!   neither `same-origin` nor `none`, is refused with 403 (other local
//!   ports share the cookie: SameSite does not separate ports). `Origin:
//!   null` (what a browser sends under `no-referrer`) passes only with
//!   `Sec-Fetch-Site: same-origin` or `none`.
//! - Bodies are capped at 16 KiB (the edit form at 20 MiB), requests at
//!   [`REQUEST_TIMEOUT`], and at most [`MAX_CONCURRENT`] run at once.
//! - After a failed login, the next attempt from that address waits a
//!   second.
//! - It speaks plain HTTP: off loopback, put a TLS proxy in front.

mod auth;
mod dlq;
mod edit;
mod groups;
mod pages;
mod render;

use crate::UsageError;
use anyhow::Context;
use auth::{Auth, Csrf, LOGIN_COOKIE, Operator, SESSION_COOKIE};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use backstop::config::{Config, ConsoleSettings};
use backstop::store::{CompensationStore, ListFilter, ManualAction, SqlStore, Status, StoreError};
use maud::Markup;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// The largest edit form accepted (an edited payload travels in one).
const MAX_FORM: usize = 20 * 1024 * 1024;
/// The largest body of every other request (the login form included).
const MAX_SMALL_FORM: usize = 16 * 1024;
/// How long a request may take before it is answered 503. DLQ operations
/// run in tasks of their own, so a request cut here leaves no broker state
/// behind.
pub(crate) const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// The most requests served at once; beyond it, 503.
pub(crate) const MAX_CONCURRENT: usize = 64;
/// The stylesheet, served from the binary.
const CSS: &str = include_str!("static/console.css");
/// The policy of every response: nothing but this origin's stylesheet and
/// script files, no inline script or style, no framing, forms to itself.
pub(crate) const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; \
     img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Options of `backstop console`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConsoleArgs {
    /// The configuration file: its [store], [[consumer]] blocks (for their
    /// dead-letter queues) and [console] section.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
    /// Where to listen; replaces [console] listen (default 127.0.0.1:9465).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

/// What every handler shares.
pub(crate) struct Console {
    store: Option<SqlStore>,
    auth: Auth,
    jobs: groups::Jobs,
    /// The DLQ dry runs waiting for their confirm.
    dry_runs: dlq::DryRuns,
    broker: crate::dlq::DlqBroker,
    dlqs: Vec<String>,
    /// Its own address, the `Host` and `Origin` it answers to.
    bound: SocketAddr,
    /// `console.allowed_hosts`, lower case.
    allowed_hosts: Vec<String>,
    /// Requests being served now.
    in_flight: Arc<tokio::sync::Semaphore>,
}

type Shared = Arc<Console>;

/// `backstop console`.
pub(crate) async fn run(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let settings = config.console.clone().unwrap_or_else(|| {
        let mut settings = ConsoleSettings::default();
        settings.apply_env();
        settings
    });
    let listen = match args.listen {
        Some(listen) => listen,
        None => settings
            .listen_addr()
            .map_err(|e| UsageError(format!("console.listen: {e}")))?,
    };
    // Before anything else: a console that may not start must not even
    // open the store.
    settings
        .check_for(listen)
        .map_err(|(key, e)| UsageError(format!("console.{key}: {e}")))?;
    let store = match &config.store.url {
        Some(url) => Some(match SqlStore::open_existing(url).await {
            Ok(store) => store,
            Err(e @ StoreError::InvalidUrl { .. }) => {
                return Err(UsageError(format!("{e} (the [store] url)")).into());
            }
            Err(e) => return Err(anyhow::Error::from(e).context("opening the store")),
        }),
        None => None,
    };
    let (stop_tx, stop) = watch::channel(false);
    let (bound, server) = serve(&config, &settings, listen, store, stop).await?;
    println!("backstop console: serving on http://{bound}/");
    let reason = crate::run::wait_for_signal_or_failure(&[]).await;
    info!(%reason, "stopping the review console");
    stop_tx.send_replace(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    Ok(ExitCode::SUCCESS)
}

/// Starts the console on `listen` (checked against the auth rules first)
/// until `stop` turns true. Returns the bound address and the server task.
pub(crate) async fn serve(
    config: &Config,
    settings: &ConsoleSettings,
    listen: SocketAddr,
    store: Option<SqlStore>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    settings
        .check_for(listen)
        .map_err(|(key, e)| UsageError(format!("console.{key}: {e}")))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| UsageError(format!("console.listen {listen}: {e}")))?;
    let bound = listener.local_addr().context("the console's address")?;
    let console = Arc::new(Console {
        store,
        auth: Auth::new(settings),
        jobs: groups::Jobs::default(),
        dry_runs: dlq::DryRuns::default(),
        broker: crate::dlq::DlqBroker::from_config(config),
        dlqs: crate::dlq::dlq_queues(config),
        bound,
        allowed_hosts: settings
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT)),
    });
    let app = router(console);
    info!(%bound, auth = settings.has_auth(), "serving the review console");
    if !bound.ip().is_loopback() {
        warn!(
            %bound,
            "the review console speaks plain HTTP: logins and session cookies cross the \
             network in clear unless a TLS proxy is in front of it (list its name in \
             console.allowed_hosts)"
        );
    }
    let task = crate::run::publish::spawn_server(listener, app, stop, "the review console");
    Ok((bound, task))
}

/// Every route, behind the login where it must be, with the security
/// headers on every response.
fn router(console: Shared) -> Router {
    let protected = Router::new()
        .route("/", get(home))
        .route("/rows", get(rows))
        .route("/rows/{id}", get(row))
        .route("/rows/{id}/action", post(row_action))
        .route(
            "/rows/{id}/edit",
            get(edit::edit_page)
                .post(edit::edit_submit)
                .layer(DefaultBodyLimit::max(MAX_FORM)),
        )
        .route("/groups/{id}", get(groups::group))
        .route("/groups/{id}/action", post(groups::group_action))
        .route("/jobs/{id}", get(groups::job))
        .route("/jobs/{id}/cancel", post(groups::cancel_job))
        .route("/dlq", get(dlq::list))
        .route("/dlq/{queue}", get(dlq::queue))
        .route("/dlq/{queue}/replay", post(dlq::replay))
        .route("/dlq/{queue}/purge", post(dlq::purge))
        .route("/logout", post(logout))
        .layer(middleware::from_fn_with_state(
            console.clone(),
            require_login,
        ));
    Router::new()
        .route("/login", get(login_page).post(login_submit))
        .route("/static/console.css", get(css))
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_SMALL_FORM))
        .layer(middleware::from_fn_with_state(
            console.clone(),
            check_origin,
        ))
        .layer(middleware::from_fn_with_state(console.clone(), check_host))
        .layer(middleware::from_fn_with_state(console.clone(), limit))
        .layer(middleware::map_response(security_headers))
        .with_state(console)
}

/// At most [`MAX_CONCURRENT`] requests at once, each answered within
/// [`REQUEST_TIMEOUT`] (503 otherwise).
async fn limit(State(console): State<Shared>, request: Request, next: Next) -> Response {
    let Ok(_permit) = console.in_flight.clone().try_acquire_owned() else {
        return PageError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the console is busy: try again in a moment",
        )
        .into_response();
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            warn!("a console request took too long and was cut");
            PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request took too long and was cut",
            )
            .into_response()
        }
    }
}

/// Whether `host` (a `Host` header value) names this console: its own
/// address, `localhost`, `127.0.0.1` or `[::1]` with its port, or a name of
/// `console.allowed_hosts` (with any port unless the entry gives one).
fn host_allowed(host: &str, bound: SocketAddr, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    if host == bound.to_string() {
        return true;
    }
    let port = bound.port();
    if ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|name| host == format!("{name}:{port}"))
    {
        return true;
    }
    // The name without its port (an IPv6 literal keeps its brackets).
    let name = match host.rsplit_once(':') {
        Some((name, p)) if !name.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            if name.starts_with('[') || !name.contains(':') {
                name
            } else {
                host.as_str()
            }
        }
        _ => host.as_str(),
    };
    allowed
        .iter()
        .any(|entry| *entry == host || (!entry.contains(':') && entry == name))
}

/// Refuses (421) a request for another `Host` than this console's: a page
/// of another name rebound to this address must not reach it.
async fn check_host(State(console): State<Shared>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if host_allowed(host, console.bound, &console.allowed_hosts) => {
            next.run(request).await
        }
        _ => {
            warn!(
                host = host.map(|h| render::cut(h, 80).0),
                "console request refused: not one of its host names (add it to console.allowed_hosts)"
            );
            PageError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "this console does not answer to this host name: add it to console.allowed_hosts",
            )
            .into_response()
        }
    }
}

/// Refuses (403) a POST sent by another origin: an `Origin` that is not
/// this console's own (the `Host` it was reached by), or a `Sec-Fetch-Site`
/// other than `same-origin` or `none`. A client sending neither (an API
/// client) passes; the CSRF token is checked after this.
async fn check_origin(request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    let headers = request.headers();
    let mut same_origin_by_fetch = false;
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if site != b"same-origin" && site != b"none" {
            warn!("console POST refused: Sec-Fetch-Site is not same-origin");
            return forbidden("this form was not sent by the console (Sec-Fetch-Site)");
        }
        same_origin_by_fetch = true;
    }
    // The console's own `Referrer-Policy: no-referrer` makes browsers send
    // `Origin: null` with its own forms: that passes only when
    // `Sec-Fetch-Site` vouched for the origin above.
    let origin_null = headers
        .get(header::ORIGIN)
        .is_some_and(|o| o.as_bytes() == b"null");
    if origin_null && same_origin_by_fetch {
        return next.run(request).await;
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let own = |scheme: &str| format!("{scheme}://{host}");
        let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
        let host_lower = own("http").to_ascii_lowercase();
        let tls_lower = own("https").to_ascii_lowercase();
        if host.is_empty() || (origin != host_lower && origin != tls_lower) {
            warn!("console POST refused: its Origin is not the console's");
            return forbidden("this form was not sent by the console (Origin)");
        }
    }
    next.run(request).await
}

/// The headers of every response.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A page that failed: its status and what to say.
#[derive(Debug)]
pub(crate) struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PageError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::StillOpen { .. } | StoreError::InvalidTransition { .. } => {
                StatusCode::CONFLICT
            }
            StoreError::InvalidEdit(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        PageError::new(status, e.to_string())
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> Self {
        PageError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = pages::layout("Error", None, pages::error(&self.message));
        (self.status, page).into_response()
    }
}

type Page = Result<Markup, PageError>;

impl Console {
    fn store(&self) -> Result<&SqlStore, PageError> {
        self.store.as_ref().ok_or_else(|| {
            PageError::new(
                StatusCode::NOT_FOUND,
                "no compensation store is configured: add [store] url to the file",
            )
        })
    }

    /// Records `action` of `op` on `target` in the console's audit table
    /// (`backstop_console_audit`). Without a store nothing can be audited:
    /// the action is refused.
    async fn audit(
        &self,
        op: &Operator,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), PageError> {
        let store = self.store.as_ref().ok_or_else(|| {
            PageError::new(
                StatusCode::CONFLICT,
                "this action is audited in the compensation store: add [store] url to the file",
            )
        })?;
        store
            .record_console_action(&op.actor(), action, target, Some(detail))
            .await?;
        Ok(())
    }

    /// The operator of a request's session cookie or `Authorization`
    /// header: `Ok(None)` without either, `Err` for a wrong header.
    fn operator(&self, headers: &HeaderMap) -> Result<Option<Operator>, ()> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            return self.auth.operator_of_header(value.as_bytes()).map(Some);
        }
        let session = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| auth::cookie(v, SESSION_COOKIE))
            .and_then(|id| self.auth.session(id));
        Ok(session.map(|s| Operator {
            name: s.name,
            csrf: Csrf::Session(s.csrf),
        }))
    }
}

/// The login wall and the CSRF check: a request without a session goes
/// to the login page (a browser) or gets 401 (an API client); a POST of a
/// session must carry its CSRF token (form field `csrf` or header
/// `X-CSRF-Token`), or it is refused with 403 before any handler runs.
async fn require_login(State(console): State<Shared>, request: Request, next: Next) -> Response {
    let operator = match console.operator(request.headers()) {
        Ok(Some(operator)) => operator,
        Ok(None) => {
            let html = request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/html"));
            return if html && request.method() == Method::GET {
                Redirect::to("/login").into_response()
            } else {
                unauthorized()
            };
        }
        Err(()) => return unauthorized(),
    };
    let mut request = if request.method() == Method::GET || request.method() == Method::HEAD {
        request
    } else {
        match &operator.csrf {
            Csrf::Bearer => request,
            Csrf::ReadOnly => {
                return forbidden("basic auth reads only: log in, or use a bearer token");
            }
            Csrf::Session(token) => {
                let (parts, body) = request.into_parts();
                let max = if parts.uri.path().ends_with("/edit") {
                    MAX_FORM
                } else {
                    MAX_SMALL_FORM
                };
                let Ok(bytes) = axum::body::to_bytes(body, max).await else {
                    return PageError::new(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large")
                        .into_response();
                };
                let given = parts
                    .headers
                    .get("x-csrf-token")
                    .map(|v| v.as_bytes().to_vec())
                    .or_else(|| form_field(&bytes, "csrf").map(String::into_bytes))
                    .unwrap_or_default();
                if !auth::same_secret(&given, token.as_bytes()) {
                    warn!(path = %parts.uri.path(), "console POST refused: missing or wrong CSRF token");
                    return forbidden(
                        "this form is stale or was not sent by the console (CSRF token missing or wrong): reload the page and try again",
                    );
                }
                Request::from_parts(parts, Body::from(bytes))
            }
        }
    };
    request.extensions_mut().insert(operator);
    next.run(request).await
}

fn unauthorized() -> Response {
    let mut response = PageError::new(
        StatusCode::UNAUTHORIZED,
        "log in at /login, or send Authorization: Bearer <console.token>",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"backstop console\""),
    );
    response
}

fn forbidden(message: &str) -> Response {
    PageError::new(StatusCode::FORBIDDEN, message).into_response()
}

/// The first value of `name` in an `application/x-www-form-urlencoded` body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let mut parts = pair.splitn(2, |&b| b == b'=');
        let key = decode_form(parts.next()?);
        (key == name).then(|| decode_form(parts.next().unwrap_or_default()))
    })
}

fn decode_form(bytes: &[u8]) -> String {
    let plus: Vec<u8> = bytes
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_encoding::percent_decode(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, on `path`.
fn set_cookie(name: &str, value: &str, path: &str, max_age: Option<u64>) -> HeaderValue {
    let age = max_age
        .map(|s| format!("; Max-Age={s}"))
        .unwrap_or_default();
    HeaderValue::from_str(&format!(
        "{name}={value}; HttpOnly; SameSite=Strict; Path={path}{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn not_found() -> PageError {
    PageError::new(StatusCode::NOT_FOUND, "no such page")
}

/// The login page, with a fresh login CSRF token in a cookie of its own.
fn login_response(console: &Console, status: StatusCode, problem: Option<&str>) -> Response {
    let token = match auth::random_token() {
        Ok(t) => t,
        Err(e) => return PageError::from(e).into_response(),
    };
    let page = pages::login(&token, console.auth.needs_secret(), problem);
    let mut response = (status, page).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &token, "/login", Some(3600)),
    );
    response
}

async fn login_page(State(console): State<Shared>) -> Response {
    login_response(&console, StatusCode::OK, None)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    login_csrf: String,
}

async fn login_submit(
    State(console): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| auth::cookie(v, LOGIN_COOKIE))
        .unwrap_or("");
    if cookie.is_empty() || !auth::same_secret(form.login_csrf.as_bytes(), cookie.as_bytes()) {
        warn!("console login refused: missing or wrong login CSRF token");
        return login_response(
            &console,
            StatusCode::FORBIDDEN,
            Some("the login form was stale: try again"),
        );
    }
    // After a failed login, this address waits before its next try.
    match console.auth.login_slot(peer.ip()) {
        Some(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
        Some(_) => {}
        None => {
            warn!(peer = %peer.ip(), "console login refused: too many failed logins");
            return login_response(
                &console,
                StatusCode::TOO_MANY_REQUESTS,
                Some("too many failed logins: wait a few seconds"),
            );
        }
    }
    let name = match console.auth.check_login(&form.name, &form.secret) {
        Ok(name) => {
            console.auth.login_succeeded(peer.ip());
            name
        }
        Err(problem) => {
            console.auth.login_failed(peer.ip());
            // Neither the name nor the secret is logged: either may be a
            // password typed in the wrong field.
            warn!(peer = %peer.ip(), "console login refused");
            return login_response(&console, StatusCode::UNAUTHORIZED, Some(problem));
        }
    };
    let (id, _csrf) = match console.auth.open_session(name.clone()) {
        Ok(s) => s,
        Err(e) => return PageError::from(e).into_response(),
    };
    info!(%name, "console login");
    let mut response = Redirect::to("/").into_response();
    let ttl = console.auth_ttl_secs();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &id, "/", Some(ttl)),
    );
    headers.append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, "", "/login", Some(0)),
    );
    response
}

impl Console {
    fn auth_ttl_secs(&self) -> u64 {
        self.auth.ttl().as_secs().max(1)
    }
}

async fn logout(State(console): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(id) = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| auth::cookie(v, SESSION_COOKIE))
    {
        console.auth.close_session(id);
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", "/", Some(0)),
    );
    response
}

/// `/`: counts by status, and the failure groups.
async fn home(State(console): State<Shared>, Extension(op): Extension<Operator>) -> Page {
    let store = console.store()?;
    let counts = store.count_by_status().await?;
    let groups = store.groups(None).await?;
    let body = maud::html! {
        h1 { "Failures" }
        (pages::status_cards(&counts))
        h2 { "Failure groups (unfinished rows by queue, error kind and cause)" }
        (groups::groups_table(&groups))
    };
    Ok(pages::layout("Failures", Some(&op), body))
}

#[derive(Deserialize)]
struct RowsQuery {
    status: Option<String>,
    queue: Option<String>,
    limit: Option<String>,
}

/// The default and largest number of rows in a list.
const ROWS_DEFAULT: i64 = 100;
const ROWS_MAX: i64 = 1000;

async fn rows(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Query(query): Query<RowsQuery>,
) -> Page {
    let store = console.store()?;
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<Status>().map_err(PageError::bad_request)?),
        None => None,
    };
    let queue = query.queue.filter(|q| !q.is_empty());
    let limit = match query.limit.as_deref().filter(|s| !s.is_empty()) {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| PageError::bad_request("limit is a number"))?
            .clamp(1, ROWS_MAX),
        None => ROWS_DEFAULT,
    };
    let filter = ListFilter {
        status,
        queue: queue.clone(),
        limit: Some(limit),
    };
    let rows = store.list(&filter).await?;
    Ok(pages::layout(
        "Rows",
        Some(&op),
        pages::rows(&rows, status, queue.as_deref(), limit),
    ))
}

async fn row(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<i64>,
) -> Page {
    let store = console.store()?;
    let row = store.get(id).await?;
    let audit = store.audit(id).await?;
    let versions = store.versions(id).await?;
    let body = pages::row(&row, &audit, &op, pages::versions(&row, &versions));
    Ok(pages::layout(&format!("Row {id}"), Some(&op), body))
}

#[derive(Deserialize)]
struct ActionForm {
    action: String,
    #[serde(default)]
    note: String,
}

/// The action named in a form, and whether it needs a note.
fn parse_action(name: &str) -> Result<(ManualAction, bool), PageError> {
    Ok(match name {
        "retry" => (ManualAction::Retry, false),
        "force_retry" => (ManualAction::ForceRetry, false),
        "discard" => (ManualAction::Discard, true),
        "resolve" => (ManualAction::Resolve, true),
        other => {
            return Err(PageError::bad_request(format!(
                "unknown action {:?}: one of retry, force_retry, discard, resolve",
                render::cut(other, 40).0
            )));
        }
    })
}

/// A note from a form: trimmed, `None` when empty; refused when required.
fn note_of(note: &str, required: bool) -> Result<Option<&str>, PageError> {
    let note = note.trim();
    if note.is_empty() {
        if required {
            return Err(PageError::bad_request("this action needs a note"));
        }
        return Ok(None);
    }
    Ok(Some(note))
}

async fn row_action(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<i64>,
    axum::Form(form): axum::Form<ActionForm>,
) -> Result<Response, PageError> {
    let store = console.store()?;
    let (action, needs_note) = parse_action(&form.action)?;
    let note = note_of(&form.note, needs_note)?;
    store.act(id, action, &op.actor(), note).await?;
    info!(id, action = action.as_str(), actor = %op.actor(), "console row action");
    Ok(Redirect::to(&format!("/rows/{id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_consoles_own_host_names_pass() {
        let bound: SocketAddr = "127.0.0.1:9465".parse().expect("addr");
        let allowed = vec!["console.example.com".to_owned(), "ops:8443".to_owned()];
        for ok in [
            "127.0.0.1:9465",
            "localhost:9465",
            "LOCALHOST:9465",
            "[::1]:9465",
            "console.example.com",
            "console.example.com:443",
            "ops:8443",
        ] {
            assert!(host_allowed(ok, bound, &allowed), "{ok}");
        }
        for bad in [
            "evil.example:9465",
            "localhost:9466",
            "127.0.0.1",
            "localhost",
            "ops:9465",
            "console.example.com.evil:443",
            "",
        ] {
            assert!(!host_allowed(bad, bound, &allowed), "{bad}");
        }
        let v6: SocketAddr = "[::1]:80".parse().expect("addr");
        assert!(host_allowed("[::1]:80", v6, &[]));
    }

    #[test]
    fn form_fields_are_decoded() {
        let body = b"note=a+b%26c&csrf=abc%3D&x";
        assert_eq!(form_field(body, "csrf").as_deref(), Some("abc="));
        assert_eq!(form_field(body, "note").as_deref(), Some("a b&c"));
        assert_eq!(form_field(body, "x").as_deref(), Some(""));
        assert_eq!(form_field(body, "y"), None);
    }
}
