//! A stored failure for the tests that fill a compensation store directly
//! (`backstop failed`, the console).
#![allow(dead_code)]

use backstop::retry::now_ms;
use backstop::store::NewFailedMessage;

/// A permanent failure of `queue` (published to `payments`/`charge`), with
/// message id `id` and `payload`: "card declined" after 3 attempts, due in
/// an hour (no scanner takes it meanwhile).
pub(crate) fn failed_message(queue: &str, id: &str, payload: &[u8]) -> NewFailedMessage {
    NewFailedMessage {
        queue: queue.to_owned(),
        exchange: "payments".to_owned(),
        routing_key: "charge".to_owned(),
        message_id: Some(id.to_owned()),
        dedup_key: None,
        payload: payload.to_vec(),
        headers: "{}".to_owned(),
        properties: "{}".to_owned(),
        error: "card declined".to_owned(),
        error_kind: "permanent".to_owned(),
        attempts: 3,
        next_attempt_at: now_ms() as i64 + 3_600_000,
        store_id: None,
        fingerprint: format!("id:{id}"),
    }
}
