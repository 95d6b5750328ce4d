//! The HTTP handler of `backstop run`: each message is POSTed as-is to the
//! consumer's endpoint, and the response decides the outcome.
//!
//! | response | outcome |
//! |---|---|
//! | any 2xx | ack |
//! | 4xx other than 408 and 429 | permanent failure: no retries |
//! | 408, 429, any 5xx, timeout, connection refused | transient: the retry schedule |
//! | any 3xx | transient: redirects are never followed |
//!
//! A `Retry-After` on a transient response, in seconds or as an HTTP date
//! (a date in the past means now), asks for that delay; the retry policy
//! uses the nearest tier at or above it. A malformed one is ignored (logged
//! at debug). The reason of a
//! failing answer quotes the start of its body (one line, 200 characters),
//! so that failures of different causes fall into different groups.
//!
//! Only a 2xx answer to the POST itself is a delivery. A client that follows
//! redirects turns a POST into a body-less GET on 301/302/303, whose 2xx (a
//! login page, a trailing-slash hop) would ack a message never delivered, and
//! re-POSTs the body to any host on 307/308. So the client follows none, and
//! a 3xx is a transient failure whose reason names the `Location`.
//!
//! With `handler.http.response = "dapr"`, a 2xx answer's body decides, as
//! Dapr's sidecar reads it: `{"status":"RETRY"}` is transient, `"DROP"`
//! takes the exhausted path ("dropped by the endpoint"), `"SUCCESS"`, no
//! status, an empty body or one that is not a JSON object with a string
//! `status` acks, and any other status is transient (see [`dapr_outcome`]).
//!
//! Failure reasons reach `x-backstop-error` headers, store rows and logs, so
//! they never carry the endpoint's credentials: reqwest's errors are shown
//! without their URL, and URLs are shown through [`RedactedUri`]. The
//! configured headers (`handler.http.headers`) are marked sensitive and
//! never quoted.

use backstop::RedactedUri;
use backstop::config::{HttpSettings, ResponseContract};
use backstop::handler::{Delivery, Handler, Outcome};
use backstop::retry::{attempt_of, header_str, header_u64};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, warn};

/// POSTs each delivery to one endpoint.
#[derive(Clone, Debug)]
pub(crate) struct HttpHandler {
    client: reqwest::Client,
    url: String,
    /// The endpoint as failure reasons show it: credentials hidden.
    shown: String,
    queue: String,
    /// This queue's series of the handler duration histogram, looked up once.
    duration: Histogram,
    /// `handler.http.headers`, marked sensitive (their `Debug` hides them).
    configured: HeaderMap,
    /// `handler.http.response`.
    contract: ResponseContract,
}

impl HttpHandler {
    /// A handler for `queue` posting to `url`, with a pooled client whose
    /// requests time out after `timeout`.
    pub(crate) fn new(
        queue: &str,
        url: &str,
        timeout: Duration,
        durations: Family<Vec<(String, String)>, Histogram>,
    ) -> anyhow::Result<Self> {
        Self::build(queue, url, timeout, None, durations)
    }

    /// A handler for `queue` as its `handler.http` settings say: the
    /// endpoint, its timeout, headers, TLS and response contract.
    pub(crate) fn from_settings(
        queue: &str,
        settings: &HttpSettings,
        durations: Family<Vec<(String, String)>, Histogram>,
    ) -> anyhow::Result<Self> {
        let tls = settings.tls_client_config()?;
        let mut handler = Self::build(queue, &settings.url, settings.timeout(), tls, durations)?;
        for (name, value) in &settings.headers {
            // Checked when the file was loaded; an error here names the
            // header, never its value.
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| anyhow::anyhow!("handler.http.headers: {name:?} is not a name"))?;
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                anyhow::anyhow!("handler.http.headers.{name}: the value is not a header value")
            })?;
            value.set_sensitive(true);
            handler.configured.insert(name, value);
        }
        handler.contract = settings.response();
        Ok(handler)
    }

    fn build(
        queue: &str,
        url: &str,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
        durations: Family<Vec<(String, String)>, Histogram>,
    ) -> anyhow::Result<Self> {
        // reqwest is built without a crypto provider of its own: use ring
        // (installing twice is harmless; the first one stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64);
        if let Some(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        Ok(HttpHandler {
            client: builder.build()?,
            url: url.to_owned(),
            shown: RedactedUri::new(url).to_string(),
            queue: queue.to_owned(),
            duration: durations
                .get_or_create(&vec![("queue".to_owned(), queue.to_owned())])
                .clone(),
            configured: HeaderMap::new(),
            contract: ResponseContract::Status,
        })
    }

    /// The delivery's headers, then the configured ones (which replace a
    /// delivery header of the same name, such as `content-type`).
    fn headers(&self, delivery: &Delivery) -> HeaderMap {
        let mut headers = delivery_headers(delivery, &self.queue);
        for (name, value) in &self.configured {
            headers.insert(name.clone(), value.clone());
        }
        headers
    }
}

/// The content type of a delivery whose message names none.
pub(crate) const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// The HTTP header carrying the message id (both ways: delivery and publish).
pub(crate) const MESSAGE_ID_HEADER: &str = "backstop-message-id";
/// The prefix of the HTTP header that carries each message header `NAME`
/// as `backstop-header-NAME` (both ways).
pub(crate) const HEADER_PREFIX: &str = "backstop-header-";

/// The HTTP headers a delivery is POSTed with. The publish endpoint reads
/// the same names back (`run::publish`), so a message can be passed on as
/// it came.
pub(crate) fn delivery_headers(delivery: &Delivery, queue: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    };
    let properties = delivery.properties();
    put(
        "content-type",
        properties
            .content_type()
            .as_ref()
            .map_or(DEFAULT_CONTENT_TYPE, |c| c.as_str()),
    );
    if let Some(id) = delivery.message_id() {
        put(MESSAGE_ID_HEADER, id);
    }
    put("backstop-attempt", &attempt_of(delivery).to_string());
    put("backstop-queue", queue);
    put("backstop-routing-key", delivery.routing_key());
    put("backstop-redelivered", &delivery.redelivered().to_string());
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            let text = header_str(value).or_else(|| header_u64(value).map(|n| n.to_string()));
            if let Some(text) = text {
                put(&format!("{HEADER_PREFIX}{}", name.as_str()), &text);
            }
        }
    }
    headers
}

/// The delay a `Retry-After` header asks for, or `None` without one or
/// when it is malformed (logged at debug).
fn retry_after(response: &reqwest::Response, queue: &str) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let delay = value
        .to_str()
        .ok()
        .and_then(|text| parse_retry_after(text, SystemTime::now()));
    if delay.is_none() {
        debug!(queue, value = ?value, "ignoring a malformed Retry-After");
    }
    delay
}

/// A `Retry-After` value as a delay from `now`: delta-seconds, or an HTTP
/// date (RFC 9110 10.2.3; the obsolete RFC 850 and asctime forms too). A
/// date in the past is zero: retry now. `None` when it is neither.
fn parse_retry_after(text: &str, now: SystemTime) -> Option<Duration> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is a very long time, not a malformed value.
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What a response status means.
pub(crate) fn outcome_of(status: u16, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=299 => Outcome::Ack,
        408 | 429 | 500..=599 => Outcome::Retry {
            delay: retry_after,
            reason: format!("the endpoint answered HTTP {status}"),
        },
        400..=499 => Outcome::reject(format!("the endpoint answered HTTP {status}")),
        // 1xx, and 3xx without a response to read its Location from: not an
        // answer about the message.
        other => Outcome::retry(format!("the endpoint answered HTTP {other}")),
    }
}

/// The most of a 2xx answer's body read for its Dapr status. A larger one is
/// not a status answer: it is read as an invalid payload, which acks.
const MAX_DAPR_BODY: usize = 64 * 1024;

/// What a 2xx answer (`status`) whose body is `body` means under
/// `response = "dapr"`, as Dapr's sidecar reads it: the body is JSON
/// `{"status": ...}`; `SUCCESS`, an empty or missing status, an empty body
/// and a body that is not such JSON ack (Dapr ignores an invalid payload);
/// `RETRY` is transient (after `retry_after` if given); `DROP` is
/// permanent, "dropped by the endpoint"; any other status is transient.
/// The status is compared as Dapr does, case and all. `None` (a body that
/// could not be read) is transient: the answer is not known.
pub(crate) fn dapr_outcome(
    status: u16,
    body: Option<&[u8]>,
    retry_after: Option<Duration>,
) -> Outcome {
    #[derive(serde::Deserialize)]
    struct Answer {
        status: Option<String>,
    }
    let Some(body) = body else {
        return Outcome::retry(format!(
            "the endpoint answered HTTP {status} but its body (the Dapr status) could not be read"
        ));
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Outcome::Ack;
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return Outcome::Ack;
    };
    match answer.status.as_deref().unwrap_or("") {
        "" | "SUCCESS" => Outcome::Ack,
        "RETRY" => Outcome::Retry {
            delay: retry_after,
            reason: format!("the endpoint answered HTTP {status} with status RETRY"),
        },
        "DROP" => Outcome::reject("dropped by the endpoint"),
        other => Outcome::Retry {
            delay: retry_after,
            reason: format!(
                "the endpoint answered HTTP {status} with the unknown status {:?}",
                one_line(other, 64).unwrap_or_default()
            ),
        },
    }
}

/// The body of `response`, or `None` when it cannot be read. Reading stops
/// past `max` bytes: a longer body comes back cut, which no JSON parser
/// accepts, so it counts as an invalid payload.
async fn body_up_to(mut response: reqwest::Response, max: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while body.len() <= max {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return Some(body),
            Err(_) => return None,
        }
    }
    Some(body)
}

/// The most of a failure answer's body a reason quotes, in characters.
const MAX_ANSWER_CHARS: usize = 200;
/// The most of a failure answer's body read to quote from.
const MAX_ANSWER_BYTES: usize = 4096;

/// What a failure answer says, for its reason: the start of its body as
/// text on one line (control characters as spaces, whitespace collapsed,
/// at most 200 characters, `...` when cut), or `None` for an empty body,
/// one that is not UTF-8 text, or one that cannot be read. At most 4 KiB is
/// read, within the request's timeout.
async fn answer_text(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while body.len() < MAX_ANSWER_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) => return None,
        }
    }
    body.truncate(MAX_ANSWER_BYTES);
    let text = match std::str::from_utf8(&body) {
        Ok(text) => text,
        // A multi-byte character cut at the limit is still text.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&body[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    one_line(text, MAX_ANSWER_CHARS)
}

/// `text` on one line: control characters as spaces, whitespace runs as
/// one space, cut at `max` characters (`...` added); `None` when empty.
fn one_line(text: &str, max: usize) -> Option<String> {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let line = words.join(" ");
    if line.is_empty() {
        return None;
    }
    if line.chars().count() <= max {
        return Some(line);
    }
    let mut cut: String = line.chars().take(max).collect();
    cut.push_str("...");
    Some(cut)
}

/// The longest `Location` a failure reason quotes.
const MAX_LOCATION: usize = 512;

impl HttpHandler {
    /// Why a 3xx answer is a failure, naming where it pointed (resolved
    /// against the endpoint, credentials hidden).
    fn redirect_reason(&self, status: u16, response: &reqwest::Response) -> String {
        let location = match response.headers().get(reqwest::header::LOCATION) {
            None => "no Location".to_owned(),
            Some(value) => match value.to_str() {
                Err(_) => "a Location that is not text".to_owned(),
                Ok(text) => {
                    let resolved = response
                        .url()
                        .join(text)
                        .map_or_else(|_| text.to_owned(), String::from);
                    let shown = RedactedUri::new(&resolved).to_string();
                    let cut = backstop::retry::truncate(&shown, MAX_LOCATION);
                    let more = if cut.len() < shown.len() { "..." } else { "" };
                    format!("Location {cut}{more}")
                }
            },
        };
        format!(
            "the endpoint answered HTTP {status} with {location}; redirects are not followed, \
             so the message was not delivered"
        )
    }

    /// Why a request failed, without the URL reqwest puts in its errors
    /// (it carries the endpoint's userinfo and query): the error and its
    /// causes, then the endpoint redacted.
    fn failure_reason(&self, error: reqwest::Error) -> String {
        let what = if error.is_timeout() {
            "the endpoint timed out"
        } else if error.is_connect() {
            "cannot connect to the endpoint"
        } else {
            "the request to the endpoint failed"
        };
        let error = error.without_url();
        let mut causes = vec![error.to_string()];
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !causes.iter().any(|c| c.contains(&text)) {
                causes.push(text);
            }
            source = cause.source();
        }
        format!("{what} {}: {}", self.shown, causes.join(": "))
    }
}

impl Handler for HttpHandler {
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let request = self
            .client
            .post(&self.url)
            .headers(self.headers(&delivery))
            .body(delivery.body().to_vec());
        let started = Instant::now();
        let response = request.send().await;
        self.duration.observe(started.elapsed().as_secs_f64());
        match response {
            Ok(response) if response.status().is_redirection() => {
                let status = response.status().as_u16();
                let reason = self.redirect_reason(status, &response);
                debug!(queue = %self.queue, status, %reason, "endpoint redirected");
                Outcome::retry(reason)
            }
            Ok(response)
                if response.status().is_success() && self.contract == ResponseContract::Dapr =>
            {
                let status = response.status().as_u16();
                let delay = retry_after(&response, &self.queue);
                let body = body_up_to(response, MAX_DAPR_BODY).await;
                let outcome = dapr_outcome(status, body.as_deref(), delay);
                match &outcome {
                    Outcome::Retry { reason, .. } if reason.contains("unknown status") => {
                        warn!(queue = %self.queue, status, %reason, "endpoint answered an unknown Dapr status; retrying");
                    }
                    _ => debug!(queue = %self.queue, status, ?outcome, "endpoint answered (dapr)"),
                }
                outcome
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let mut outcome = outcome_of(status, retry_after(&response, &self.queue));
                if let Outcome::Retry { reason, .. } | Outcome::Reject { reason, .. } = &mut outcome
                {
                    // The endpoint's own words tell one cause from another
                    // (the status alone is masked when failures are grouped).
                    if let Some(said) = answer_text(response).await {
                        reason.push_str(": ");
                        reason.push_str(&said);
                    }
                }
                debug!(queue = %self.queue, status, ?outcome, "endpoint answered");
                outcome
            }
            Err(e) => Outcome::retry(self.failure_reason(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_quoted_on_one_line_and_cut() {
        assert_eq!(
            one_line("card declined\r\n\tfor order 42\0!", 200).as_deref(),
            Some("card declined for order 42 !")
        );
        assert_eq!(one_line(" \n\t", 200), None);
        assert_eq!(one_line("", 200), None);
        assert_eq!(one_line("ééééé", 3).as_deref(), Some("ééé..."));
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_a_past_date_is_now() {
        // Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(parse_retry_after("120", now), secs(120));
        assert_eq!(parse_retry_after(" 0 ", now), secs(0));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            secs(u64::MAX)
        );
        for date in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(parse_retry_after(date, now), secs(30), "{date}");
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            secs(0),
            "the present is now"
        );
        assert_eq!(
            parse_retry_after("Sat, 01 Jan 1994 00:00:00 GMT", now),
            secs(0),
            "a date in the past is now"
        );
        for malformed in [
            "",
            "-5",
            "1.5",
            "soon",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "12 s",
        ] {
            assert_eq!(parse_retry_after(malformed, now), None, "{malformed:?}");
        }
    }

    #[test]
    fn the_dapr_contract_reads_a_2xx_body_as_dapr_does() {
        let ack = |body: &str| dapr_outcome(200, Some(body.as_bytes()), None);
        for body in [
            "",
            " \n",
            r#"{"status":"SUCCESS"}"#,
            r#"{"status":""}"#,
            r#"{"other":1}"#,
            r#"{"status":null}"#,
            // Not a status answer: Dapr ignores an invalid payload.
            "OK",
            "[1,2]",
            r#"{"status":5}"#,
            r#"{"status":"RETRY""#,
        ] {
            assert_eq!(ack(body), Outcome::Ack, "{body:?}");
        }
        assert_eq!(
            dapr_outcome(
                202,
                Some(&br#"{"status":"RETRY","why":"busy"}"#[..]),
                Some(Duration::from_secs(4))
            ),
            Outcome::Retry {
                delay: Some(Duration::from_secs(4)),
                reason: "the endpoint answered HTTP 202 with status RETRY".into()
            }
        );
        assert_eq!(
            ack(r#"{"status":"DROP"}"#),
            Outcome::reject("dropped by the endpoint")
        );
        // Compared as Dapr compares: "retry" and "drop" are unknown, retried.
        for unknown in ["retry", "drop", "success", "LATER"] {
            match ack(&format!(r#"{{"status":"{unknown}"}}"#)) {
                Outcome::Retry {
                    delay: None,
                    reason,
                } => {
                    assert!(
                        reason.contains("unknown status") && reason.contains(unknown),
                        "{reason}"
                    )
                }
                other => panic!("{unknown}: {other:?}"),
            }
        }
        // An unreadable body is no answer: retried.
        assert!(matches!(
            dapr_outcome(200, None, None),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn every_row_of_the_status_table() {
        assert_eq!(outcome_of(200, None), Outcome::Ack);
        assert_eq!(outcome_of(204, None), Outcome::Ack);
        assert!(matches!(outcome_of(400, None), Outcome::Reject { .. }));
        assert!(matches!(outcome_of(404, None), Outcome::Reject { .. }));
        assert!(matches!(outcome_of(422, None), Outcome::Reject { .. }));
        for status in [408, 429, 500, 502, 503] {
            assert!(
                matches!(outcome_of(status, None), Outcome::Retry { delay: None, .. }),
                "{status}"
            );
        }
        assert_eq!(
            outcome_of(503, Some(Duration::from_secs(7))),
            Outcome::Retry {
                delay: Some(Duration::from_secs(7)),
                reason: "the endpoint answered HTTP 503".into()
            }
        );
    }
}
