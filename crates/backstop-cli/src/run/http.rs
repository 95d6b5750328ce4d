//! The HTTP handler of `backstop run`: each message is POSTed as-is to the
//! consumer's endpoint, and the response decides the outcome.
//!
//! | response | outcome |
//! |---|---|
//! | any 2xx | ack |
//! | 4xx other than 408 and 429 | permanent failure: no retries |
//! | 408, 429, any 5xx, timeout, connection refused | transient: the retry schedule |
//!
//! A `Retry-After` (in seconds) on a transient response asks for that delay;
//! the retry policy uses the nearest tier at or above it.

use backstop::handler::{Delivery, Handler, Outcome};
use backstop::retry::{attempt_of, header_str, header_u64};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, Instant};
use tracing::debug;

/// POSTs each delivery to one endpoint.
#[derive(Clone, Debug)]
pub(crate) struct HttpHandler {
    client: reqwest::Client,
    url: String,
    queue: String,
    /// This queue's series of the handler duration histogram, looked up once.
    duration: Histogram,
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
        // reqwest is built without a crypto provider of its own: use ring
        // (installing twice is harmless; the first one stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(HttpHandler {
            client,
            url: url.to_owned(),
            queue: queue.to_owned(),
            duration: durations
                .get_or_create(&vec![("queue".to_owned(), queue.to_owned())])
                .clone(),
        })
    }

    fn headers(&self, delivery: &Delivery) -> HeaderMap {
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
                .map_or("application/octet-stream", |c| c.as_str()),
        );
        if let Some(id) = delivery.message_id() {
            put("backstop-message-id", id);
        }
        put("backstop-attempt", &attempt_of(delivery).to_string());
        put("backstop-queue", &self.queue);
        put("backstop-routing-key", delivery.routing_key());
        put("backstop-redelivered", &delivery.redelivered().to_string());
        if let Some(table) = properties.headers() {
            for (name, value) in table.inner() {
                let text = header_str(value).or_else(|| header_u64(value).map(|n| n.to_string()));
                if let Some(text) = text {
                    put(&format!("backstop-header-{}", name.as_str()), &text);
                }
            }
        }
        headers
    }
}

/// The delay a `Retry-After` header asks for (delta-seconds only).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    value
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
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
        // 1xx and unfollowed 3xx: not an answer about the message.
        other => Outcome::retry(format!("the endpoint answered HTTP {other}")),
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
            Ok(response) => {
                let status = response.status().as_u16();
                let outcome = outcome_of(status, retry_after(&response));
                debug!(queue = %self.queue, status, ?outcome, "endpoint answered");
                outcome
            }
            Err(e) if e.is_timeout() => Outcome::retry(format!("the endpoint timed out: {e}")),
            Err(e) if e.is_connect() => {
                Outcome::retry(format!("cannot connect to the endpoint: {e}"))
            }
            Err(e) => Outcome::retry(format!("the request failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
