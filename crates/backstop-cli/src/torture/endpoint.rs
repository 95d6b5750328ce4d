//! The torture endpoint: an in-process HTTP server that answers every POST
//! from a seeded mix, and the ledger of every request and its answer.
//!
//! The answer is a pure function of (seed, business id, attempt header,
//! the business id's request counter) and the order's [`Fate`]: an order
//! that must succeed gets transient failures first and then a 2xx, one
//! that must fail never gets a 2xx. An EFFECT is a 2xx returned to a POST
//! on `/in`. A redirect, a reset, and a slow answer (a 503 sent after the
//! client's timeout) never are; neither is anything served on the redirect
//! target `/landing`, which only records that it was reached.
//!
//! A reset drops the connection without an answer (with `SO_LINGER` 0, so
//! the client sees a TCP reset): the server's sockets are wrapped so that a
//! handler can poison its own connection.

use super::plan::{Fate, Without, stable_hash};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::serve::{IncomingStream, Listener};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// What the endpoint answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A 2xx, with a small JSON body or none.
    Success { status: u16, body: bool },
    /// 200 with a 10 MiB body.
    Big,
    /// A redirect to `/landing`.
    Redirect(u16),
    /// 408 or 429.
    Throttle {
        status: u16,
        retry_after: Option<u64>,
    },
    /// A 5xx.
    ServerError(u16),
    /// 503 after sleeping past the client's timeout.
    Slow,
    /// No answer: the connection was reset.
    Reset,
    /// A permanent refusal (400, 404, 409, 422).
    Refuse(u16),
    /// The request had no business id in its body: 400.
    Unreadable,
}

impl Answer {
    /// True for a 2xx returned to the POST itself.
    pub(crate) fn is_effect(self) -> bool {
        matches!(self, Answer::Success { .. } | Answer::Big)
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Success { status, body: true } => write!(f, "{status} with a body"),
            Answer::Success {
                status,
                body: false,
            } => write!(f, "{status}"),
            Answer::Big => f.write_str("200 with a 10 MiB body"),
            Answer::Redirect(status) => write!(f, "{status} to /landing"),
            Answer::Throttle {
                status,
                retry_after: Some(s),
            } => write!(f, "{status} Retry-After: {s}"),
            Answer::Throttle { status, .. } => write!(f, "{status}"),
            Answer::ServerError(status) => write!(f, "{status}"),
            Answer::Slow => f.write_str("503 after the client's timeout"),
            Answer::Reset => f.write_str("connection reset"),
            Answer::Refuse(status) => write!(f, "{status}"),
            Answer::Unreadable => f.write_str("400 (no business id in the body)"),
        }
    }
}

/// Draws the answer to one request.
pub(crate) fn pick(
    seed: u64,
    order: &str,
    attempt: u32,
    counter: u32,
    fate: Fate,
    without: &[Without],
) -> Answer {
    let mut rng = fastrand::Rng::with_seed(stable_hash(&[
        &seed.to_le_bytes(),
        order.as_bytes(),
        &attempt.to_le_bytes(),
        &counter.to_le_bytes(),
    ]));
    match fate {
        Fate::Succeed { failures } if counter >= failures => {
            if !without.contains(&Without::Big) && rng.u32(0..100) < 5 {
                return Answer::Big;
            }
            let status = [200, 200, 201, 204][rng.usize(0..4)];
            Answer::Success {
                status,
                body: status != 204 && rng.bool(),
            }
        }
        Fate::Permanent if counter > 0 || rng.u32(0..100) >= 30 => {
            Answer::Refuse([400, 404, 409, 422][rng.usize(0..4)])
        }
        _ => transient(&mut rng, without),
    }
}

fn transient(rng: &mut fastrand::Rng, without: &[Without]) -> Answer {
    // (weight, kind): drawn among the kinds not excluded.
    let table: [(u32, Without); 5] = [
        (15, Without::Redirect),
        (20, Without::Throttle),
        (30, Without::ServerError),
        (10, Without::Slow),
        (15, Without::Reset),
    ];
    let allowed: Vec<(u32, Without)> = table
        .into_iter()
        .filter(|(_, kind)| !without.contains(kind))
        .collect();
    let total: u32 = allowed.iter().map(|(w, _)| w).sum();
    let mut draw = if total == 0 { 0 } else { rng.u32(0..total) };
    let mut kind = Without::ServerError;
    for (weight, candidate) in allowed {
        if draw < weight {
            kind = candidate;
            break;
        }
        draw -= weight;
    }
    match kind {
        Without::Redirect => Answer::Redirect([301, 302, 307][rng.usize(0..3)]),
        Without::Throttle => Answer::Throttle {
            status: if rng.bool() { 408 } else { 429 },
            retry_after: rng.bool().then_some(1),
        },
        Without::Slow => Answer::Slow,
        Without::Reset => Answer::Reset,
        _ => Answer::ServerError([500, 502, 503][rng.usize(0..3)]),
    }
}

/// One POST to `/in`.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    /// When it arrived, from the round's start.
    pub(crate) at: Duration,
    pub(crate) message_id: String,
    /// The business id from the body (empty when it had none).
    pub(crate) order: String,
    /// `Backstop-Attempt`.
    pub(crate) attempt: u32,
    /// `Backstop-Redelivered`.
    pub(crate) redelivered: bool,
    pub(crate) answer: Answer,
}

/// One request that reached the redirect target.
#[derive(Clone, Debug)]
pub(crate) struct Landing {
    pub(crate) at: Duration,
    pub(crate) method: String,
    pub(crate) message_id: String,
    pub(crate) order: String,
}

#[derive(Debug, Default)]
struct Book {
    requests: Vec<Request>,
    landings: Vec<Landing>,
    per_order: HashMap<String, u32>,
    busy: usize,
}

/// Every request and answer of a round.
#[derive(Debug)]
pub(crate) struct Ledger {
    book: Mutex<Book>,
    start: Instant,
    seed: u64,
    fates: HashMap<String, Fate>,
    without: Vec<Without>,
    /// The sidecar's HTTP timeout: a slow answer sleeps past it.
    timeout: Duration,
}

impl Ledger {
    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock leaves a book that is still whole.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The requests so far, in arrival order.
    pub(crate) fn requests(&self) -> Vec<Request> {
        self.book().requests.clone()
    }

    /// The redirect target's hits so far.
    pub(crate) fn landings(&self) -> Vec<Landing> {
        self.book().landings.clone()
    }

    /// Requests being answered now.
    pub(crate) fn busy(&self) -> usize {
        self.book().busy
    }

    /// Requests received so far.
    pub(crate) fn received(&self) -> usize {
        self.book().requests.len()
    }

    fn since_start(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Counts a request as busy until dropped (also when the client goes away
/// and the handler's future is dropped).
struct Busy<'a>(&'a Ledger);

impl<'a> Busy<'a> {
    fn new(ledger: &'a Ledger) -> Self {
        ledger.book().busy += 1;
        Busy(ledger)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut book = self.0.book();
        book.busy = book.busy.saturating_sub(1);
    }
}

/// The running endpoint; stops when dropped.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) ledger: Arc<Ledger>,
    /// `http://127.0.0.1:PORT/in`
    pub(crate) url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    /// Starts the endpoint on an ephemeral loopback port. `start` is the
    /// round's clock.
    pub(crate) async fn start(
        seed: u64,
        fates: HashMap<String, Fate>,
        without: Vec<Without>,
        timeout: Duration,
        start: Instant,
    ) -> std::io::Result<Self> {
        let ledger = Arc::new(Ledger {
            book: Mutex::default(),
            start,
            seed,
            fates,
            without,
            timeout,
        });
        let listener = ResettableListener(TcpListener::bind("127.0.0.1:0").await?);
        let addr = listener.0.local_addr()?;
        let app = Router::new()
            .route("/in", post(receive))
            .route("/landing", any(landing))
            .with_state(ledger.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).await;
        });
        Ok(Endpoint {
            ledger,
            url: format!("http://{addr}/in"),
            task,
        })
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn order_of(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("order")?.as_str().map(str::to_owned)
}

async fn receive(
    State(ledger): State<Arc<Ledger>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _busy = Busy::new(&ledger);
    let at = ledger.since_start();
    let message_id = header(&headers, "backstop-message-id")
        .unwrap_or("")
        .to_owned();
    // A missing or garbled attempt header is recorded as attempt 0.
    let attempt = header(&headers, "backstop-attempt")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let redelivered = header(&headers, "backstop-redelivered") == Some("true");
    let order = order_of(&body);
    let answer = match &order {
        None => Answer::Unreadable,
        Some(order) => {
            let mut book = ledger.book();
            let counter = book.per_order.entry(order.clone()).or_insert(0);
            let n = *counter;
            *counter += 1;
            // An order the plan does not know (a stray message) is refused.
            match ledger.fates.get(order) {
                Some(fate) => pick(ledger.seed, order, attempt, n, *fate, &ledger.without),
                None => Answer::Refuse(404),
            }
        }
    };
    // Written down before any wait: hyper drops this future when the
    // client hangs up (as it does at its timeout during a slow answer).
    ledger.book().requests.push(Request {
        at,
        message_id,
        order: order.unwrap_or_default(),
        attempt,
        redelivered,
        answer,
    });
    if answer == Answer::Slow {
        tokio::time::sleep(ledger.timeout + Duration::from_millis(500)).await;
    }
    respond(answer, &peer)
}

fn respond(answer: Answer, peer: &Peer) -> Response {
    let status = |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    match answer {
        Answer::Success { status: code, body } => {
            let text = if body { r#"{"accepted":true}"# } else { "" };
            (status(code), text).into_response()
        }
        Answer::Big => (StatusCode::OK, Body::from(vec![b'x'; 10 << 20])).into_response(),
        Answer::Redirect(code) => (status(code), [("location", "/landing")]).into_response(),
        Answer::Throttle {
            status: code,
            retry_after: Some(secs),
        } => (status(code), [("retry-after", secs.to_string())]).into_response(),
        Answer::Throttle { status: code, .. }
        | Answer::ServerError(code)
        | Answer::Refuse(code) => status(code).into_response(),
        Answer::Slow => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Answer::Unreadable => StatusCode::BAD_REQUEST.into_response(),
        Answer::Reset => {
            peer.reset.store(true, Ordering::SeqCst);
            // Never written: the connection fails on its first write.
            StatusCode::OK.into_response()
        }
    }
}

async fn landing(
    State(ledger): State<Arc<Ledger>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let landing = Landing {
        at: ledger.since_start(),
        method: method.to_string(),
        message_id: header(&headers, "backstop-message-id")
            .unwrap_or("")
            .to_owned(),
        order: order_of(&body).unwrap_or_default(),
    };
    ledger.book().landings.push(landing);
    StatusCode::OK
}

/// The peer of a connection, with the switch that resets it.
#[derive(Clone, Debug)]
struct Peer {
    #[allow(dead_code)]
    addr: SocketAddr,
    reset: Arc<AtomicBool>,
}

impl Connected<IncomingStream<'_, ResettableListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP listener whose connections a handler can reset.
struct ResettableListener(TcpListener);

impl Listener for ResettableListener {
    type Io = Resettable;
    type Addr = Peer;

    async fn accept(&mut self) -> (Resettable, Peer) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    let reset = Arc::new(AtomicBool::new(false));
                    return (
                        Resettable {
                            stream,
                            reset: reset.clone(),
                        },
                        Peer { addr, reset },
                    );
                }
                // Out of file descriptors and the like: wait, then go on.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.0.local_addr()?,
            reset: Arc::default(),
        })
    }
}

/// A server socket that fails every read and write once its switch is on.
struct Resettable {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Resettable {
    fn poisoned(&self) -> Option<std::io::Error> {
        if !self.reset.load(Ordering::SeqCst) {
            return None;
        }
        // Linger 0: the close sends RST rather than FIN. With a zero
        // timeout the close never blocks, which is why tokio deprecates
        // the call for other values.
        #[allow(deprecated)]
        let _ = self.stream.set_linger(Some(Duration::ZERO));
        Some(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }
}

impl AsyncRead for Resettable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poisoned() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Resettable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poisoned() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poisoned() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poisoned() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_follow_the_fate() {
        for counter in 0..20 {
            for attempt in 1..4 {
                let a = pick(1, "o", attempt, counter, Fate::Permanent, &[]);
                assert!(!a.is_effect(), "{a}");
                let a = pick(1, "o", attempt, counter, Fate::Exhaust, &[]);
                assert!(!a.is_effect(), "{a}");
                let a = pick(1, "o", attempt, counter, Fate::Succeed { failures: 2 }, &[]);
                assert_eq!(a.is_effect(), counter >= 2, "{a}");
            }
        }
        assert_eq!(
            pick(9, "x", 2, 0, Fate::Exhaust, &[]),
            pick(9, "x", 2, 0, Fate::Exhaust, &[])
        );
    }

    #[test]
    fn excluded_kinds_are_never_drawn() {
        let without = [
            Without::Redirect,
            Without::Reset,
            Without::Slow,
            Without::Big,
        ];
        for counter in 0..500 {
            let a = pick(3, "o", 1, counter, Fate::Exhaust, &without);
            assert!(
                !matches!(a, Answer::Redirect(_) | Answer::Reset | Answer::Slow),
                "{a}"
            );
            let a = pick(3, "o", 1, counter, Fate::Succeed { failures: 0 }, &without);
            assert_ne!(a, Answer::Big);
        }
    }
}
