//! The publish endpoint of `backstop run` (`[publish]`): a service in any
//! language publishes with the publisher's guarantees over HTTP.
//!
//! `POST /publish/{exchange}/{routing_key}`: the body is the payload, as
//! bytes. Both segments are percent-decoded (`%2F` for a `/` in a routing
//! key); `amq.default`, or an empty segment (`/publish//orders`), is the
//! default exchange. Headers map back into the message as a delivery's map
//! out to the consumer's endpoint ([`super::http::delivery_headers`]):
//! `Content-Type` is the content type, `Backstop-Message-Id` the message id,
//! and each `Backstop-Header-NAME: VALUE` the message header `NAME` (a
//! string). `Idempotency-Key` is the message id too, so a client's retry is
//! absorbed by the consumer's deduplication on the message id.
//!
//! | answer | when |
//! |---|---|
//! | `202 {"status":"confirmed"}` | the broker confirmed the message |
//! | `202 {"status":"spooled"}` | the message is durably in the spool; the publisher sends it once the broker takes it |
//! | `400` | a bad path, header or message id |
//! | `401` | a token is configured and the request does not carry it |
//! | `413` | the body is above `max_message_size` (nothing is published) |
//! | `422` | the broker will not take it as sent: unroutable (`mandatory`, no queue bound) or refused (access, size); the same request fails again |
//! | `503` | not known to be stored (no confirm in time, nacked, no connection, the spool could not be written); retry with the same `Idempotency-Key` |
//! | `507` | the spool is full: back off; nothing was dropped |
//!
//! Every error answer is JSON naming its reason:
//! `{"error":"spool_full","message":"..."}`. Neither the token nor the
//! body is ever logged.

use super::http::{HEADER_PREFIX, MESSAGE_ID_HEADER};
use super::metrics::PublishView;
use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backstop::config::{Config, PublishSettings, Secret};
use backstop::publish::{Message, PublishError, Published, Publisher};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The longest AMQP short string: exchange, routing key, message id,
/// content type and header names.
const SHORTSTR_MAX: usize = 255;

/// The exchange name that stands for the default exchange `""` in a path.
pub(crate) const DEFAULT_EXCHANGE_ALIAS: &str = "amq.default";

/// The endpoint's state.
pub(crate) struct PublishEndpoint {
    publisher: Publisher,
    token: Option<Secret>,
    max_message_size: usize,
    /// What `/metrics` shows of it.
    view: PublishView,
}

/// A refused request: its status, the reason's code and its text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    fn too_large(limit: usize) -> Self {
        Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: format!("the body is above max_message_size ({limit} bytes)"),
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value}\n"),
    )
        .into_response()
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = json(
            self.status,
            &serde_json::json!({ "error": self.code, "message": self.message }),
        );
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// Equal without an early exit, so the time taken does not tell how much
/// of a guessed token was right (only whether its length was).
pub(crate) fn same_secret(given: &[u8], wanted: &[u8]) -> bool {
    if given.len() != wanted.len() {
        return false;
    }
    let difference = given
        .iter()
        .zip(wanted)
        .fold(0u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)));
    difference == 0
}

/// Checks `Authorization: Bearer TOKEN` when a token is configured.
fn authorize(headers: &HeaderMap, token: Option<&Secret>) -> Result<(), Refusal> {
    let Some(token) = token else {
        return Ok(());
    };
    // The scheme's name is case-insensitive (RFC 9110), the token is not.
    let given = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| v.split_at_checked(7))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, token)| token);
    match given {
        Some(given) if same_secret(given, token.expose().as_bytes()) => Ok(()),
        _ => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "this endpoint needs Authorization: Bearer <publish.token>".into(),
        }),
    }
}

/// `(exchange, routing_key)` from the raw path `/publish/{exchange}/{routing_key}`:
/// split before decoding, so that `%2F` stays inside its segment.
pub(crate) fn destination(path: &str) -> Result<(String, String), Refusal> {
    let shape = || {
        Refusal::bad_request(
            "the path is /publish/{exchange}/{routing_key}, each segment percent-encoded",
        )
    };
    let rest = path.strip_prefix("/publish/").ok_or_else(shape)?;
    let (exchange, routing_key) = rest.split_once('/').ok_or_else(shape)?;
    if routing_key.contains('/') {
        return Err(shape());
    }
    let decode = |what: &str, raw: &str| {
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
        let text = String::from_utf8(bytes)
            .map_err(|_| Refusal::bad_request(format!("the {what} is not UTF-8")))?;
        if text.len() > SHORTSTR_MAX {
            return Err(Refusal::bad_request(format!(
                "the {what} is {} bytes long; AMQP allows {SHORTSTR_MAX}",
                text.len()
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(Refusal::bad_request(format!(
                "the {what} holds a control character"
            )));
        }
        Ok(text)
    };
    let mut exchange = decode("exchange", exchange)?;
    if exchange == DEFAULT_EXCHANGE_ALIAS {
        exchange.clear();
    }
    Ok((exchange, decode("routing key", routing_key)?))
}

/// The one value of header `name`, as UTF-8 text; `None` when absent.
fn text_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Refusal> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Refusal::bad_request(format!("{name} is repeated")));
    }
    std::str::from_utf8(value.as_bytes())
        .map(Some)
        .map_err(|_| Refusal::bad_request(format!("{name} is not UTF-8")))
}

/// A value that must fit an AMQP short string, non-empty.
fn short_text(name: &str, value: &str) -> Result<ShortString, Refusal> {
    if value.is_empty() {
        return Err(Refusal::bad_request(format!("{name} is empty")));
    }
    if value.len() > SHORTSTR_MAX {
        return Err(Refusal::bad_request(format!(
            "{name} is {} bytes long; AMQP allows {SHORTSTR_MAX}",
            value.len()
        )));
    }
    Ok(value.into())
}

/// The message's properties and id from the request's headers: the inverse
/// of [`super::http::delivery_headers`] for what a publisher chooses
/// (content type, message id, headers). The headers that describe a
/// delivery (`Backstop-Attempt`, `-Queue`, `-Routing-Key`, `-Redelivered`)
/// are ignored: the path names where the message goes.
pub(crate) fn properties_from(
    headers: &HeaderMap,
) -> Result<(BasicProperties, Option<String>), Refusal> {
    let mut properties = BasicProperties::default();
    if let Some(content_type) = text_header(headers, header::CONTENT_TYPE.as_str())? {
        properties = properties.with_content_type(short_text("Content-Type", content_type)?);
    }
    let key = text_header(headers, "idempotency-key")?
        .map(|k| short_text("Idempotency-Key", k))
        .transpose()?;
    let id = text_header(headers, MESSAGE_ID_HEADER)?
        .map(|k| short_text("Backstop-Message-Id", k))
        .transpose()?;
    let message_id = match (key, id) {
        (Some(key), Some(id)) if key != id => {
            return Err(Refusal::bad_request(
                "Idempotency-Key and Backstop-Message-Id differ: send one",
            ));
        }
        (key, id) => key.or(id).map(|k| k.to_string()),
    };
    let mut table = FieldTable::default();
    for name in headers.keys() {
        let Some(field) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let field = short_text("a Backstop-Header- name", field)?;
        // Backstop's own failure headers and the broker's dead-letter
        // records are read back by the retry path and `dlq replay`: a
        // client must not forge them.
        let lower = field.as_str().to_ascii_lowercase();
        if lower.starts_with("x-backstop-")
            || lower == "x-death"
            || lower.starts_with("x-first-death")
            || lower.starts_with("x-last-death")
        {
            return Err(Refusal::bad_request(
                "Backstop-Header-x-backstop-* and the broker's x-death headers are reserved",
            ));
        }
        let value = text_header(headers, name.as_str())?.unwrap_or_default();
        table.insert(field, AMQPValue::LongString(value.into()));
    }
    if !table.inner().is_empty() {
        properties = properties.with_headers(table);
    }
    Ok((properties, message_id))
}

/// The answer to a publish that reached the publisher.
pub(crate) fn answer(result: Result<Published, PublishError>) -> Response {
    match result {
        Ok(published) => {
            let status = if published.is_spooled() {
                "spooled"
            } else {
                "confirmed"
            };
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "status": status, "message_id": published.message_id() }),
            )
        }
        Err(e) => refusal_of(&e).into_response(),
    }
}

/// What a publish error answers: 507 for a full spool, 422 for what the
/// broker will refuse again (no queue bound, a missing exchange, no
/// permission, too large for the broker), 503 for what may pass on a retry.
fn refusal_of(error: &PublishError) -> Refusal {
    let (status, code) = match error {
        PublishError::SpoolFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "spool_full"),
        PublishError::Unroutable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unroutable"),
        PublishError::Refused { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
        PublishError::Spool { .. } => (StatusCode::SERVICE_UNAVAILABLE, "spool_failed"),
        PublishError::Nacked { .. } => (StatusCode::SERVICE_UNAVAILABLE, "nacked"),
        PublishError::Timeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
        PublishError::Blocked { .. } => (StatusCode::SERVICE_UNAVAILABLE, "blocked"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    Refusal {
        status,
        code,
        message: error.to_string(),
    }
}

/// Reads the body, at most `limit` bytes.
async fn body_within(body: Body, limit: usize) -> Result<Vec<u8>, Refusal> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Refusal::bad_request(format!("reading the body failed: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(Refusal::too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The message a request asks to publish; the body is read last, once
/// everything else is known to be acceptable.
async fn message_of(endpoint: &PublishEndpoint, request: Request) -> Result<Message, Refusal> {
    let (parts, body) = request.into_parts();
    authorize(&parts.headers, endpoint.token.as_ref())?;
    let (exchange, routing_key) = destination(parts.uri.path())?;
    let limit = endpoint.max_message_size;
    if let Some(length) = parts.headers.get(header::CONTENT_LENGTH) {
        let length = length
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or_else(|| Refusal::bad_request("Content-Length is not a number"))?;
        if length > limit as u64 {
            return Err(Refusal::too_large(limit));
        }
    }
    let (properties, message_id) = properties_from(&parts.headers)?;
    let body = body_within(body, limit).await?;
    let message = Message::new(exchange, routing_key, body).with_properties(properties);
    Ok(match message_id {
        Some(id) => message.with_message_id(id),
        None => message,
    })
}

/// Counts a request in flight until it is dropped (answered, or given up
/// when its client went away).
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn publish(State(endpoint): State<Arc<PublishEndpoint>>, request: Request) -> Response {
    endpoint.view.in_flight.inc();
    let _in_flight = InFlight(endpoint.view.in_flight.clone());
    let response = match message_of(&endpoint, request).await {
        Err(refusal) => {
            debug!(status = %refusal.status, reason = refusal.code, "publish request refused");
            refusal.into_response()
        }
        Ok(message) => {
            let (exchange, routing_key) = (
                message.exchange().to_owned(),
                message.routing_key().to_owned(),
            );
            // On a task of its own: a client that hangs up does not cancel
            // a publish half-way (a cancelled send taints its channel; a
            // cancelled spool append commits unanswered).
            let publisher = endpoint.publisher.clone();
            let published = tokio::spawn(async move { publisher.publish(message).await }).await;
            let response = answer(published.unwrap_or_else(|e| {
                Err(PublishError::Spool {
                    reason: format!("internal: the publish task failed: {e}"),
                })
            }));
            debug!(%exchange, %routing_key, status = %response.status(), "publish answered");
            response
        }
    };
    endpoint
        .view
        .answers
        .get_or_create(&vec![(
            "code".to_owned(),
            response.status().as_u16().to_string(),
        )])
        .inc();
    response
}

/// How long a publish may take beyond its confirm timeout: writing the
/// spool.
const SPOOL_MARGIN: Duration = Duration::from_secs(10);

/// The publish endpoint of `backstop run`, running.
pub(crate) struct Publishing {
    /// Where it listens.
    pub(crate) bound: std::net::SocketAddr,
    /// What `/metrics` shows of it.
    pub(crate) view: PublishView,
    server: tokio::task::JoinHandle<()>,
    /// How long the requests in flight may take once it is stopped.
    drain_bound: Duration,
}

/// Starts the publisher and serves the endpoint until `stop` turns true.
pub(crate) async fn start(
    config: &Config,
    settings: &PublishSettings,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Publishing> {
    let listen = settings
        .listen_addr()
        .map_err(|e| crate::UsageError(format!("publish.listen: {e}")))?;
    let Some(builder) = config.publisher("backstop-run")? else {
        anyhow::bail!("internal: no [publish] section to start");
    };
    let publisher = builder
        .start()
        .await
        .context("starting the publisher of [publish]")?;
    let view = PublishView::new(publisher.clone());
    let endpoint = PublishEndpoint {
        publisher,
        token: settings.token.clone(),
        max_message_size: settings.max_message_size(),
        view: view.clone(),
    };
    let (bound, server) = serve(listen, endpoint, stop).await?;
    Ok(Publishing {
        bound,
        view,
        server,
        drain_bound: settings.confirm_timeout() + SPOOL_MARGIN,
    })
}

impl Publishing {
    /// Once `stop` has turned true (the server no longer accepts): waits
    /// for the requests in flight to be answered, then closes the
    /// publisher, each wait bounded. Names what overran its bound.
    pub(crate) async fn stop(self, close_bound: Duration) -> Vec<String> {
        let mut abandoned = Vec::new();
        if tokio::time::timeout(self.drain_bound, self.server)
            .await
            .is_err()
        {
            warn!(
                bound = ?self.drain_bound,
                "the publish endpoint did not answer its requests in flight in time: abandoned; \
                 their clients see the connection end and retry"
            );
            abandoned.push("the publish endpoint".to_owned());
        }
        let publisher = &self.view.publisher;
        if tokio::time::timeout(close_bound, publisher.close())
            .await
            .is_err()
        {
            warn!(bound = ?close_bound, "the publisher did not close in time: abandoned");
            abandoned.push("the publisher".to_owned());
        }
        let spooled = publisher.stats().spool_messages;
        if spooled > 0 {
            info!(spooled, "messages stay in the spool for the next start");
        }
        abandoned
    }
}

/// Serves the endpoint on `listen` until `stop` turns true, then stops
/// accepting and finishes the requests in flight. Returns the bound address
/// and the server's task (done once the last request is answered).
async fn serve(
    listen: std::net::SocketAddr,
    endpoint: PublishEndpoint,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/publish/{*destination}", post(publish))
        .with_state(Arc::new(endpoint));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::UsageError(format!("publish.listen {listen}: {e}")))?;
    let bound = listener.local_addr()?;
    info!(%bound, "serving POST /publish/{{exchange}}/{{routing_key}}");
    Ok((
        bound,
        spawn_server(listener, app, stop, "the publish endpoint"),
    ))
}

/// Serves `app` on `listener` in a task of its own until `stop` turns
/// true (a graceful shutdown: requests in flight are answered).
pub(crate) fn spawn_server(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        // The peer's address is an extension of every request (the
        // console delays failed logins per address).
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(error = %e, "{what} stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop::handler::Delivery;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn the_path_is_split_before_it_is_decoded() {
        let ok = |path: &str| destination(path).expect(path);
        assert_eq!(
            ok("/publish/orders/created"),
            ("orders".into(), "created".into())
        );
        assert_eq!(
            ok("/publish/amq.default/jobs"),
            (String::new(), "jobs".into())
        );
        assert_eq!(ok("/publish//jobs"), (String::new(), "jobs".into()));
        assert_eq!(ok("/publish/events/"), ("events".into(), String::new()));
        assert_eq!(
            ok("/publish/ev%20ents/a.b%2Fc.%23.%2A"),
            ("ev ents".into(), "a.b/c.#.*".into())
        );
        assert_eq!(ok("/publish/x/caf%C3%A9"), ("x".into(), "café".into()));
        for bad in [
            "/publish/orders",
            "/publish/a/b/c",
            "/publish/x/%FF",
            "/publish/x/a%0Ab",
            "/other/x/y",
        ] {
            let refusal = destination(bad).expect_err(bad);
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let long = format!("/publish/x/{}", "k".repeat(256));
        assert!(destination(&long).is_err());
        let longest = format!("/publish/x/{}", "k".repeat(255));
        assert!(destination(&longest).is_ok());
    }

    /// What a delivery's headers say, read back, is the message again.
    #[test]
    fn a_delivery_maps_back_to_its_message() {
        let mut table = FieldTable::default();
        table.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
        table.insert("region".into(), AMQPValue::ShortString("eu".into()));
        let sent = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("order-7".into())
            .with_headers(table);
        let delivery = Delivery::for_test(b"{}".to_vec(), sent);
        let http = super::super::http::delivery_headers(&delivery, "orders");
        let (properties, id) = properties_from(&http).expect("maps back");
        assert_eq!(id.as_deref(), Some("order-7"));
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let back = properties.headers().clone().expect("headers");
        assert_eq!(back.inner().len(), 2, "{back:?}");
        assert_eq!(
            back.inner().get("x-tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        assert_eq!(
            back.inner().get("region"),
            Some(&AMQPValue::LongString("eu".into()))
        );
    }

    #[test]
    fn the_idempotency_key_is_the_message_id_and_is_checked() {
        let id = |pairs: &[(&str, &[u8])]| properties_from(&headers(pairs)).map(|(_, id)| id);
        assert_eq!(id(&[("idempotency-key", b"k-1")]), Ok(Some("k-1".into())));
        assert_eq!(id(&[]), Ok(None));
        assert_eq!(
            id(&[("idempotency-key", b"k-1"), ("backstop-message-id", b"k-1")]),
            Ok(Some("k-1".into()))
        );
        let long = "k".repeat(256);
        for bad in [
            vec![("idempotency-key", &b""[..])],
            vec![("idempotency-key", long.as_bytes())],
            vec![("idempotency-key", &b"caf\xe9"[..])],
            vec![
                ("idempotency-key", &b"a"[..]),
                ("idempotency-key", &b"b"[..]),
            ],
            vec![
                ("idempotency-key", &b"a"[..]),
                ("backstop-message-id", &b"b"[..]),
            ],
            vec![("backstop-header-x", &b"\xff"[..])],
            vec![("content-type", "t".repeat(256).as_bytes())],
        ] {
            let refusal = id(&bad).expect_err("refused");
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert!(id(&[("idempotency-key", "k".repeat(255).as_bytes())]).is_ok());
    }

    #[test]
    fn the_token_is_checked_when_configured() {
        let token = Secret::new("t0ken");
        assert!(authorize(&headers(&[]), None).is_ok());
        for good in [&b"Bearer t0ken"[..], b"bearer t0ken"] {
            assert!(authorize(&headers(&[("authorization", good)]), Some(&token)).is_ok());
        }
        for bad in [
            &b""[..],
            b"Bearer t0ke",
            b"Bearer t0ken2",
            b"Bearer T0KEN",
            b"Bearer",
            b"Basic dDBrZW4=",
        ] {
            let given = if bad.is_empty() {
                headers(&[])
            } else {
                headers(&[("authorization", bad)])
            };
            let refusal = authorize(&given, Some(&token)).expect_err("refused");
            assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        }
    }
}
