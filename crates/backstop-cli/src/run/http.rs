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
//! status, an empty body or one that does not start as a JSON object acks,
//! and any other status, a body that starts as an object but cannot be read
//! as one, or a compressed body is transient (see [`dapr_outcome`]).
//!
//! Failure reasons reach `x-backstop-error` headers, store rows and logs, so
//! they never carry the endpoint's credentials: reqwest's errors are shown
//! without their URL, and URLs are shown through [`RedactedUri`]. The
//! configured headers (`handler.http.headers`) are marked sensitive and
//! never quoted, and where an answer's own words are quoted, each configured
//! value in them (an endpoint echoing the token it refused) is `***`.

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
    /// The configured header values, and each of their words, of 8 bytes or
    /// more, longest first: hidden wherever an answer is quoted ([`scrub`]).
    secrets: Secrets,
    /// `handler.http.response`.
    contract: ResponseContract,
}

impl HttpHandler {
    /// A handler for `queue` posting to `url`, with a pooled client whose
    /// requests time out after `timeout` (the demo's).
    #[cfg(feature = "fault-tools")]
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
        for (name, secret) in &settings.headers {
            // Checked when the file was loaded; an error here names the
            // header, never its value.
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| anyhow::anyhow!("handler.http.headers: {name:?} is not a name"))?;
            let mut value = HeaderValue::from_str(secret.expose()).map_err(|_| {
                anyhow::anyhow!("handler.http.headers.{name}: the value is not a header value")
            })?;
            value.set_sensitive(true);
            handler.configured.insert(name, value);
        }
        handler.secrets = Secrets::new(settings.headers.values().map(|s| s.expose()));
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
            secrets: Secrets::default(),
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

/// The shortest configured header value (or word of one) hidden in quoted
/// answers: shorter ones (`Bearer`, `json`) would hide ordinary words.
const MIN_SECRET: usize = 8;

/// The configured header values, and each of their words, of
/// [`MIN_SECRET`] bytes or more, longest first: hidden wherever an answer
/// is quoted.
#[derive(Clone, Debug, Default)]
pub(crate) struct Secrets(Vec<String>);

impl Secrets {
    /// The secrets of these configured header values.
    pub(crate) fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets: Vec<String> = Vec::new();
        for value in values {
            secrets.push(value.to_owned());
            secrets.extend(value.split_whitespace().map(str::to_owned));
        }
        secrets.retain(|s| s.len() >= MIN_SECRET);
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Secrets(secrets)
    }

    /// `text` with each secret in it replaced by `***`. Done before a quote
    /// is cut, so that no part of a secret is left at the cut.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.0 {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }
}

/// The most of a 2xx answer's body read for its Dapr status. Past it, a
/// status object not closed yet is not known: transient.
const MAX_DAPR_BODY: usize = 64 * 1024;

/// What a 2xx answer (`status`) whose body is `body` means under
/// `response = "dapr"`, as Dapr's sidecar reads it (Go's `encoding/json`
/// decoder: the first JSON value only, trailing data ignored, keys matched
/// case-insensitively, invalid UTF-8 replaced). The body is JSON
/// `{"status": ...}`; `SUCCESS`, an empty, missing or non-string status,
/// an empty body and a body whose first byte (after JSON whitespace) is not
/// `{` ack (Dapr ignores an invalid payload); `RETRY` is transient (after
/// `retry_after` if given); `DROP` is permanent, "dropped by the endpoint";
/// any other status is transient, quoted with `secrets` hidden. The status
/// value is compared as Dapr does, case and all. Its key is `status` or
/// any key equal to it ignoring case; the last such key in the document
/// wins, as in Go. Where Dapr would
/// ignore the payload but the answer is not known, it is transient: `None`
/// (a body that could not be read), and a body that starts as an object
/// but cannot be read as one (cut at [`MAX_DAPR_BODY`], malformed).
pub(crate) fn dapr_outcome(
    status: u16,
    body: Option<&[u8]>,
    retry_after: Option<Duration>,
    secrets: &Secrets,
) -> Outcome {
    let Some(body) = body else {
        return Outcome::retry(format!(
            "the endpoint answered HTTP {status} but its body (the Dapr status) could not be read"
        ));
    };
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Outcome::Ack;
    }
    let text = String::from_utf8_lossy(body);
    let first_value = serde_json::Deserializer::from_str(&text)
        .into_iter::<DaprAnswer>()
        .next();
    let Some(Ok(answer)) = first_value else {
        let cut = if body.len() > MAX_DAPR_BODY {
            " (it is longer than 64 KiB)"
        } else {
            ""
        };
        return Outcome::retry(format!(
            "the endpoint answered HTTP {status} with a body that starts as a JSON object but \
             cannot be read as one{cut}: its Dapr status is not known"
        ));
    };
    // A status that is not a string fails Go's decoding, which Dapr
    // ignores: success.
    let said = match &answer {
        DaprAnswer::Status(said) => said.as_str(),
        DaprAnswer::NotAString => "",
    };
    match said {
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
                one_line(&secrets.scrub(other), 64).unwrap_or_default()
            ),
        },
    }
}

/// A Dapr answer object as Go's `encoding/json` decodes it into Dapr's
/// `{ Status string }`: every key that matches `status` ([`is_status_key`])
/// sets it, in document order, so the last one wins; `null` leaves it as it
/// was; other values are skipped unread ([`serde::de::IgnoredAny`]: no
/// number conversion, no building of nested values).
#[derive(Debug)]
enum DaprAnswer {
    /// The status said (`""` when none).
    Status(String),
    /// A status that is not a string (Go's decoding fails).
    NotAString,
}

impl<'de> serde::Deserialize<'de> for DaprAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DaprAnswer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<DaprAnswer, A::Error> {
                let mut said = String::new();
                let mut not_a_string = false;
                while let Some(key) = map.next_key::<String>()? {
                    if !is_status_key(&key) {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(value) => said = value,
                        serde_json::Value::Null => {}
                        _ => not_a_string = true,
                    }
                }
                Ok(if not_a_string {
                    DaprAnswer::NotAString
                } else {
                    DaprAnswer::Status(said)
                })
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Whether a JSON key is `status` as Go's decoder matches a field name:
/// case-insensitively, under Unicode simple folding (`ſ`, U+017F, folds to
/// `s`).
fn is_status_key(key: &str) -> bool {
    key.chars()
        .map(|c| {
            if c == 'ſ' {
                's'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .eq("status".chars())
}

/// Why a response's body cannot be read for its Dapr status: a
/// `Content-Encoding` other than `identity` (quoted, cut to 32 characters),
/// or `None`.
fn coded_body(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(reqwest::header::CONTENT_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes());
        if text
            .split(',')
            .map(str::trim)
            .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
        {
            return Some(one_line(&text, 32).unwrap_or_default());
        }
    }
    None
}

/// The body of `response`, or `None` when it cannot be read. Reading stops
/// past `max` bytes: a longer body comes back cut (longer than `max`).
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
/// one that is not UTF-8 text, or one that cannot be read. Each of `secrets`
/// in it is `***`. At most 4 KiB is read, within the request's timeout.
async fn answer_text(mut response: reqwest::Response, secrets: &Secrets) -> Option<String> {
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
    one_line(&secrets.scrub(text), MAX_ANSWER_CHARS)
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
                let outcome = if let Some(coding) = coded_body(response.headers()) {
                    Outcome::retry(format!(
                        "the endpoint answered HTTP {status} with a body in Content-Encoding {:?}: \
                         its Dapr status is not known",
                        self.secrets.scrub(&coding)
                    ))
                } else {
                    let body = body_up_to(response, MAX_DAPR_BODY).await;
                    dapr_outcome(status, body.as_deref(), delay, &self.secrets)
                };
                match &outcome {
                    Outcome::Retry { reason, .. }
                        if reason.contains("unknown status") || reason.contains("not known") =>
                    {
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
                    if let Some(said) = answer_text(response, &self.secrets).await {
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
        let none = Secrets::default();
        let ack = |body: &str| dapr_outcome(200, Some(body.as_bytes()), None, &none);
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
            "\"{}\"",
        ] {
            assert_eq!(ack(body), Outcome::Ack, "{body:?}");
        }
        assert_eq!(
            dapr_outcome(
                202,
                Some(&br#"{"status":"RETRY","why":"busy"}"#[..]),
                Some(Duration::from_secs(4)),
                &none
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
            dapr_outcome(200, None, None, &none),
            Outcome::Retry { .. }
        ));
    }

    /// Review of issue 20: a 2xx body Dapr reads as a status is never acked
    /// on a parse failure. Go's decoder reads the first value only, matches
    /// the key ignoring case, takes the last duplicate, replaces invalid
    /// UTF-8; a body that starts as an object but cannot be read as one
    /// (cut at the cap, malformed) is transient, never an ack.
    #[test]
    fn the_dapr_contract_reads_the_first_value_as_go_does_and_never_acks_an_unread_object() {
        let none = Secrets::default();
        let outcome = |body: &[u8]| dapr_outcome(200, Some(body), None, &none);
        let drop = Outcome::reject("dropped by the endpoint");
        for body in [
            &br#"{"Status":"DROP"}"#[..],
            br#"{"STATUS":"DROP"}"#,
            "{\"\u{17f}tatus\":\"DROP\"}".as_bytes(),
            br#" {"status":"DROP"} and then some text"#,
            br#"{"status":"DROP"}{"status":"SUCCESS"}"#,
            br#"{"status":"SUCCESS","status":"DROP"}"#,
            b"{\"note\":\"\xff\xfe\",\"status\":\"DROP\"}",
            // The last key equal to `status` ignoring case wins, in
            // document order, as in Go; null changes nothing.
            br#"{"Status":"SUCCESS","status":"DROP"}"#,
            br#"{"status":"SUCCESS","Status":"DROP"}"#,
            br#"{"zz":1,"STATUS":"SUCCESS","aa":2,"Status":"DROP"}"#,
            br#"{"status":"DROP","status":null}"#,
            // Other values are skipped unread: numbers out of range, lone
            // surrogates.
            br#"{"n":1e400,"s":"\ud800","status":"DROP"}"#,
        ] {
            assert_eq!(outcome(body), drop, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            outcome(br#"{"Status":"SUCCESS","STATUS":"RETRY"}"#),
            Outcome::Retry {
                delay: None,
                reason: "the endpoint answered HTTP 200 with status RETRY".into()
            }
        );
        assert_eq!(
            outcome(br#"{"status":"DROP","Status":5}"#),
            Outcome::Ack,
            "a status that is not a string fails Go's decoding: Dapr acks"
        );
        // A complete first value within the cap is read even when the body
        // goes on past it.
        let mut long = br#"{"status":"DROP"}"#.to_vec();
        long.resize(MAX_DAPR_BODY + 1, b' ');
        assert_eq!(outcome(&long), drop);
        // Not starting as an object: an invalid payload, acked as by Dapr
        // (a gzip body's first byte is 0x1f).
        for body in [
            &b"\x1f\x8b\x08\x00"[..],
            b"\x0c{\"status\":\"DROP\"}",
            b"null",
        ] {
            assert_eq!(outcome(body), Outcome::Ack, "{body:?}");
        }
        // Starting as an object but not readable as one: transient.
        let mut cut = br#"{"status":"SUCCESS","pad":""#.to_vec();
        cut.resize(MAX_DAPR_BODY + 1, b'x');
        for (body, why) in [
            (&br#"{"status":"RETRY""#[..], ""),
            (br#"{"status":"DROP",}"#, ""),
            (b"\n{", ""),
            (&cut, " (it is longer than 64 KiB)"),
        ] {
            assert_eq!(
                outcome(body),
                Outcome::retry(format!(
                    "the endpoint answered HTTP 200 with a body that starts as a JSON object \
                     but cannot be read as one{why}: its Dapr status is not known"
                )),
                "{}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
        }
    }

    #[test]
    fn a_coded_dapr_body_is_named() {
        use reqwest::header::CONTENT_ENCODING;
        let coded = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(CONTENT_ENCODING, HeaderValue::from_static(value));
            }
            coded_body(&headers)
        };
        assert_eq!(coded(&[]), None);
        assert_eq!(coded(&["identity"]), None);
        assert_eq!(coded(&["Identity", ""]), None);
        assert_eq!(coded(&["gzip"]).as_deref(), Some("gzip"));
        assert_eq!(coded(&["identity", "br"]).as_deref(), Some("br"));
        assert_eq!(
            coded(&["identity, zstd"]).as_deref(),
            Some("identity, zstd")
        );
    }

    /// Review of issue 20: an endpoint echoing the configured token in its
    /// answer does not put it in a reason (x-backstop-error, store rows,
    /// logs), not even a part of it left at the cut.
    #[tokio::test]
    async fn a_configured_header_value_is_never_quoted_from_an_answer() {
        let secrets = Secrets::new(["Bearer s3cret-t0ken-abc", "k3y-value-9", "short"]);
        assert_eq!(
            secrets.scrub("401 invalid token 'Bearer s3cret-t0ken-abc' (s3cret-t0ken-abc)"),
            "401 invalid token '***' (***)"
        );
        assert_eq!(
            secrets.scrub("short Bearer k3y-value-9"),
            "short Bearer ***"
        );
        let answer = |text: String| {
            let secrets = secrets.clone();
            async move {
                answer_text(
                    reqwest::Response::from(axum::http::Response::new(text)),
                    &secrets,
                )
                .await
            }
        };
        assert_eq!(
            answer("401 invalid token 'Bearer s3cret-t0ken-abc'".into())
                .await
                .as_deref(),
            Some("401 invalid token '***'")
        );
        let cut = answer(format!("{}s3cret-t0ken-abc", "x".repeat(190))).await;
        let cut = cut.expect("quoted");
        assert!(!cut.contains("s3cret"), "{cut}");
        let status = format!("{}k3y-value-9", "y".repeat(60));
        match dapr_outcome(
            200,
            Some(format!(r#"{{"status":"{status}"}}"#).as_bytes()),
            None,
            &secrets,
        ) {
            Outcome::Retry { reason, .. } => {
                assert!(
                    reason.contains("unknown status") && !reason.contains("k3y"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
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
