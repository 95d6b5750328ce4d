//! The ledger invariant, checked per business id once a round drained:
//!
//! - handled: the endpoint returned an EFFECT (a 2xx to the POST itself)
//!   for the business id exactly once. Each `kill -9` allows one extra per
//!   handler slot, counted and printed. Without a dedup key every message
//!   is its own business id, and after a connection fault its redelivery
//!   may be handled again: counted, not hidden;
//! - or parked: each failing message exactly once in the DLQ (extra copies
//!   after a connection fault are counted), or its business id as exactly
//!   one unfinished row in the compensation store (one per message id
//!   without a dedup key);
//! - or expired in the broker before it was settled (the publisher's TTL);
//! - never handled and parked at once, and nothing left in a main queue or
//!   a retry tier.

use super::endpoint::{Landing, Request};
use super::plan::{KeyShape, Plan, STORE_CONSUMER};
use std::fmt::Write as _;
use std::time::Duration;

/// A message read from a queue at the end of a round.
#[derive(Clone, Debug, Default)]
pub(crate) struct Parked {
    pub(crate) message_id: String,
    /// The business id from its body.
    pub(crate) order: String,
    /// Failure headers, for the history.
    pub(crate) note: String,
}

/// A compensation store row of the round's store consumer.
#[derive(Clone, Debug)]
pub(crate) struct StoredRow {
    pub(crate) id: i64,
    pub(crate) message_id: String,
    pub(crate) order: String,
    pub(crate) status: String,
    pub(crate) finished: bool,
    pub(crate) error: String,
    pub(crate) attempts: i64,
}

/// Everything a round saw.
#[derive(Debug)]
pub(crate) struct Observed {
    pub(crate) requests: Vec<Request>,
    pub(crate) landings: Vec<Landing>,
    pub(crate) dlq: Vec<Parked>,
    pub(crate) expired: Vec<Parked>,
    /// (queue, message) left in a queue that must drain.
    pub(crate) leftovers: Vec<(String, Parked)>,
    pub(crate) rows: Vec<StoredRow>,
    /// When each fault struck, and what it was.
    pub(crate) faults: Vec<(Duration, String)>,
    pub(crate) dedup_on: bool,
    /// Handler slots over all consumers.
    pub(crate) slots: u32,
    /// False when the round's deadline passed first.
    pub(crate) drained: bool,
    /// What went wrong when the sidecar was stopped with SIGTERM at the end.
    pub(crate) shutdown: Option<String>,
}

impl Observed {
    fn kills(&self) -> u32 {
        self.faults
            .iter()
            .filter(|(_, f)| f.starts_with("kill"))
            .count() as u32
    }

    /// Faults after which the broker redelivers what was unacked.
    fn connection_faults(&self) -> usize {
        self.faults.len()
    }
}

/// The round's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) published: u64,
    /// Business ids with an effect.
    pub(crate) handled: u64,
    /// Messages in the DLQ.
    pub(crate) dead_lettered: u64,
    /// Unfinished store rows.
    pub(crate) stored: u64,
    /// Messages the broker expired (their TTL) before they were settled.
    pub(crate) expired: u64,
    /// Effects beyond the first for one business id, after a `kill -9`.
    pub(crate) extra_effects: u64,
    /// Keyless messages handled again after a connection fault.
    pub(crate) redelivered_effects: u64,
    /// DLQ copies beyond the first for one message, after a connection fault.
    pub(crate) extra_dead_letters: u64,
    /// Requests that reached the redirect target.
    pub(crate) redirects_followed: u64,
}

impl Summary {
    pub(crate) fn add(&mut self, other: &Summary) {
        self.published += other.published;
        self.handled += other.handled;
        self.dead_lettered += other.dead_lettered;
        self.stored += other.stored;
        self.expired += other.expired;
        self.extra_effects += other.extra_effects;
        self.redelivered_effects += other.redelivered_effects;
        self.extra_dead_letters += other.extra_dead_letters;
        self.redirects_followed += other.redirects_followed;
    }

    /// The ledger line's counts.
    pub(crate) fn line(&self) -> String {
        format!(
            "published={} handled={} dead_lettered={} stored={} expired={} extra_effects={} \
             redelivered_effects={} extra_dead_letters={} redirects_followed={}",
            self.published,
            self.handled,
            self.dead_lettered,
            self.stored,
            self.expired,
            self.extra_effects,
            self.redelivered_effects,
            self.extra_dead_letters,
            self.redirects_followed
        )
    }
}

/// The outcome of the check.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    pub(crate) summary: Summary,
    /// One line per broken business id, in plan order.
    pub(crate) broken: Vec<String>,
    /// The first broken order's index in the plan.
    pub(crate) first_broken: Option<usize>,
    /// Allowed but counted: every extra effect and extra DLQ copy, by
    /// business id, so that none is hidden in a total.
    pub(crate) counted: Vec<String>,
}

/// Checks every business id of `plan` against what was observed.
pub(crate) fn check(plan: &Plan, seen: &Observed) -> Checked {
    let mut out = Checked::default();
    out.summary.published = plan.messages.len() as u64;
    out.summary.dead_lettered = seen.dlq.len() as u64;
    out.summary.stored = seen.rows.iter().filter(|r| !r.finished).count() as u64;
    out.summary.expired = seen.expired.len() as u64;
    out.summary.redirects_followed = seen.landings.len() as u64;
    let effects_of = |pred: &dyn Fn(&Request) -> bool| {
        seen.requests
            .iter()
            .filter(|r| r.answer.is_effect() && pred(r))
            .count()
    };
    let count = |list: &[Parked], id: &str| list.iter().filter(|p| p.message_id == id).count();
    let mut worst: Option<(usize, usize)> = None; // (order, effects)
    let mut problems: Vec<(usize, String)> = Vec::new();

    for (index, order) in plan.orders.iter().enumerate() {
        let mut broken = |why: String| problems.push((index, format!("{}: {why}", order.id)));
        let messages: Vec<&str> = plan
            .messages
            .iter()
            .filter(|m| m.order == index)
            .map(|m| m.message_id.as_str())
            .collect();
        let keyed = seen.dedup_on && order.key != KeyShape::Absent;
        let effects = effects_of(&|r| r.order == order.id);
        let dlq: Vec<&Parked> = seen.dlq.iter().filter(|p| p.order == order.id).collect();
        let rows: Vec<&StoredRow> = seen
            .rows
            .iter()
            .filter(|r| r.order == order.id && !r.finished)
            .collect();
        if effects > 0 {
            out.summary.handled += 1;
        }

        // Handled once.
        if keyed && effects > 1 {
            if seen.kills() == 0 {
                broken(format!(
                    "the endpoint returned an effect {effects} times for one business id, with no kill -9"
                ));
            } else {
                out.summary.extra_effects += effects as u64 - 1;
                out.counted.push(format!(
                    "{}: {effects} effects for one business id (allowed after kill -9)",
                    order.id
                ));
                if worst.is_none_or(|(_, e)| effects > e) {
                    worst = Some((index, effects));
                }
            }
        }
        if !keyed {
            for id in &messages {
                let n = effects_of(&|r| r.message_id == *id);
                if n > 1 {
                    if seen.connection_faults() == 0 {
                        broken(format!(
                            "message {id} (no dedup key) was handled {n} times with no fault to redeliver it"
                        ));
                    } else {
                        out.summary.redelivered_effects += n as u64 - 1;
                        out.counted.push(format!(
                            "{}: message {id} without a dedup key handled {n} times (redelivered after a fault)",
                            order.id
                        ));
                    }
                }
            }
        }
        // Never handled and parked.
        if effects > 0 && (!dlq.is_empty() || !rows.is_empty()) {
            broken(format!(
                "handled ({effects} effect(s)) and also parked ({} DLQ message(s), {} store row(s))",
                dlq.len(),
                rows.len()
            ));
        }
        // An order the endpoint accepts ends handled, unless it expired.
        if !order.fate.fails() && effects == 0 && (!dlq.is_empty() || !rows.is_empty()) {
            broken(
                "parked although the endpoint accepts it (its fate is to succeed within the retry tiers)"
                    .into(),
            );
        }
        // Every message is accounted for.
        for id in &messages {
            let handled = effects_of(&|r| r.message_id == *id) > 0;
            let deduplicated = keyed && effects > 0;
            // A store row stands for its fingerprint: with a dedup key,
            // every message of the business id (a repeat updates the row).
            let parked = count(&seen.dlq, id) > 0
                || (keyed && !rows.is_empty())
                || rows.iter().any(|r| r.message_id == *id);
            let expired = count(&seen.expired, id) > 0;
            if !(handled || deduplicated || parked || expired) {
                let followed = seen.landings.iter().filter(|l| l.message_id == *id).count();
                let requests = seen.requests.iter().filter(|r| r.message_id == *id).count();
                let hint = if followed > 0 {
                    format!(
                        "; the sidecar followed {followed} redirect(s) for it and took the landing page's 200 for a delivery"
                    )
                } else if requests == 0 {
                    "; it never reached the endpoint".to_owned()
                } else {
                    String::new()
                };
                broken(format!(
                    "LOST: message {id} is neither handled, nor a duplicate of a handled business id, \
                     nor parked, nor expired ({requests} request(s)){hint}"
                ));
            }
            for (queue, left) in &seen.leftovers {
                if left.message_id == *id {
                    broken(format!("message {id} is still in {queue}"));
                }
            }
        }
        // Parked exactly once.
        if order.consumer == STORE_CONSUMER {
            if keyed && rows.len() > 1 {
                broken(format!(
                    "{} unfinished store rows for one business id (rows {}); one failing message must be one row to review",
                    rows.len(),
                    rows.iter()
                        .map(|r| format!("#{}", r.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !keyed {
                for id in &messages {
                    let n = rows.iter().filter(|r| r.message_id == *id).count();
                    if n > 1 {
                        broken(format!("{n} unfinished store rows for message {id}"));
                    }
                }
            }
        } else {
            for id in &messages {
                let n = count(&seen.dlq, id);
                if n > 1 {
                    if seen.connection_faults() == 0 {
                        broken(format!("message {id} is in the DLQ {n} times"));
                    } else {
                        out.summary.extra_dead_letters += n as u64 - 1;
                        out.counted.push(format!(
                            "{}: message {id} is in the DLQ {n} times (redelivered after a fault)",
                            order.id
                        ));
                    }
                }
            }
        }
    }
    let allowed = u64::from(seen.kills()) * u64::from(seen.slots);
    if out.summary.extra_effects > allowed
        && let Some((index, effects)) = worst
    {
        problems.push((
            index,
            format!(
                "{}: {} extra effects in the round exceed {allowed} ({} kill -9 x {} handler slots); this one had {effects}",
                plan.orders[index].id,
                out.summary.extra_effects,
                seen.kills(),
                seen.slots
            ),
        ));
    }
    if !seen.drained {
        problems.push((
            usize::MAX,
            "the round did not drain before --round-timeout".to_owned(),
        ));
    }
    if let Some(problem) = &seen.shutdown {
        problems.push((usize::MAX, problem.clone()));
    }
    problems.sort_by_key(|(index, _)| *index);
    out.first_broken = problems
        .iter()
        .map(|(i, _)| *i)
        .find(|i| *i < plan.orders.len());
    out.broken = problems.into_iter().map(|(_, why)| why).collect();
    out
}

/// The full history of order `index`: its messages, every request and
/// answer, redirect hits, the faults, store rows, DLQ and expired copies.
pub(crate) fn history(plan: &Plan, seen: &Observed, index: usize, queues: &[String; 2]) -> String {
    let order = &plan.orders[index];
    let mut text = String::new();
    let secs = |d: Duration| format!("{:>7.3}s", d.as_secs_f64());
    let _ = writeln!(
        text,
        "first broken business id {} (queue {}, fate {:?}, {})",
        order.id,
        queues[order.consumer],
        order.fate,
        order.key.describe()
    );
    if let Some(key) = order.key_bytes() {
        let lossy = String::from_utf8_lossy(key);
        let twins: Vec<&str> = plan
            .orders
            .iter()
            .filter(|o| o.id != order.id && o.consumer == order.consumer)
            .filter(|o| {
                o.key_bytes()
                    .is_some_and(|k| String::from_utf8_lossy(k) == lossy)
            })
            .map(|o| o.id.as_str())
            .collect();
        if !twins.is_empty() {
            let _ = writeln!(
                text,
                "  its key decodes lossily to the same text as the key of {} on the same queue",
                twins.join(", ")
            );
        }
    }
    let _ = writeln!(text, "  messages:");
    for m in plan.messages.iter().filter(|m| m.order == index) {
        let _ = writeln!(
            text,
            "    {} {} published{}{}{}",
            secs(m.at),
            m.message_id,
            if m.duplicate {
                ", a deliberate duplicate"
            } else {
                ""
            },
            if m.ttl { ", with a 5 s TTL" } else { "" },
            if m.long_note {
                ", with a 10 KiB header"
            } else {
                ""
            },
        );
    }
    let _ = writeln!(
        text,
        "  requests (time, message, attempt, redelivered, answer):"
    );
    for r in seen.requests.iter().filter(|r| r.order == order.id) {
        let _ = writeln!(
            text,
            "    {} {} attempt={} redelivered={} -> {}{}",
            secs(r.at),
            r.message_id,
            r.attempt,
            r.redelivered,
            r.answer,
            if r.answer.is_effect() { "  EFFECT" } else { "" }
        );
    }
    let ids: Vec<&str> = plan
        .messages
        .iter()
        .filter(|m| m.order == index)
        .map(|m| m.message_id.as_str())
        .collect();
    for l in seen
        .landings
        .iter()
        .filter(|l| l.order == order.id || ids.contains(&l.message_id.as_str()))
    {
        let _ = writeln!(
            text,
            "    {} {} reached the redirect target /landing with {}",
            secs(l.at),
            l.message_id,
            l.method
        );
    }
    let _ = writeln!(text, "  faults:");
    for (at, fault) in &seen.faults {
        let _ = writeln!(text, "    {} {fault}", secs(*at));
    }
    let _ = writeln!(text, "  store rows:");
    for r in seen.rows.iter().filter(|r| r.order == order.id) {
        let _ = writeln!(
            text,
            "    #{} {} message {} attempts={} error={:?}",
            r.id, r.status, r.message_id, r.attempts, r.error
        );
    }
    let _ = writeln!(text, "  DLQ:");
    for p in seen.dlq.iter().filter(|p| p.order == order.id) {
        let _ = writeln!(text, "    {} {}", p.message_id, p.note);
    }
    let _ = writeln!(text, "  expired by the broker:");
    for p in seen.expired.iter().filter(|p| p.order == order.id) {
        let _ = writeln!(text, "    {}", p.message_id);
    }
    for (queue, p) in seen.leftovers.iter().filter(|(_, p)| p.order == order.id) {
        let _ = writeln!(text, "  left in {queue}: {} {}", p.message_id, p.note);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::endpoint::Answer;
    use super::super::plan::{Fate, Message, Order};
    use super::*;

    fn plan() -> Plan {
        let order = |id: &str, consumer, fate| Order {
            id: id.into(),
            consumer,
            fate,
            key: KeyShape::Text(id.into()),
        };
        let message = |id: &str, order| Message {
            message_id: id.into(),
            order,
            at: Duration::ZERO,
            ttl: false,
            long_note: false,
            duplicate: false,
        };
        Plan {
            orders: vec![
                order("a", STORE_CONSUMER, Fate::Succeed { failures: 0 }),
                order("b", STORE_CONSUMER, Fate::Permanent),
            ],
            messages: vec![
                message("a1", 0),
                message("a2", 0),
                message("b1", 1),
                message("b2", 1),
            ],
            faults: vec![],
        }
    }

    fn request(id: &str, order: &str, answer: Answer) -> Request {
        Request {
            at: Duration::ZERO,
            message_id: id.into(),
            order: order.into(),
            attempt: 1,
            redelivered: false,
            answer,
        }
    }

    fn row(id: i64, message: &str, order: &str) -> StoredRow {
        StoredRow {
            id,
            message_id: message.into(),
            order: order.into(),
            status: "pending".into(),
            finished: false,
            error: String::new(),
            attempts: 1,
        }
    }

    fn observed() -> Observed {
        Observed {
            requests: vec![
                request(
                    "a1",
                    "a",
                    Answer::Success {
                        status: 200,
                        body: false,
                    },
                ),
                request("b1", "b", Answer::Refuse(422)),
                request("b2", "b", Answer::Refuse(422)),
            ],
            landings: vec![],
            dlq: vec![],
            expired: vec![],
            leftovers: vec![],
            rows: vec![row(1, "b1", "b")],
            faults: vec![],
            dedup_on: true,
            slots: 8,
            drained: true,
            shutdown: None,
        }
    }

    #[test]
    fn a_clean_round_holds() {
        let mut seen = observed();
        // One row for b (its duplicate updated it).
        seen.rows = vec![row(1, "b1", "b")];
        let checked = check(&plan(), &seen);
        assert!(checked.broken.is_empty(), "{:?}", checked.broken);
        assert_eq!(checked.summary.handled, 1);
        assert_eq!(checked.summary.stored, 1);
    }

    #[test]
    fn two_rows_for_one_business_id_break_it() {
        let mut seen = observed();
        seen.rows.push(row(2, "b2", "b"));
        let checked = check(&plan(), &seen);
        assert_eq!(checked.first_broken, Some(1));
        assert!(
            checked.broken[0].contains("2 unfinished store rows"),
            "{:?}",
            checked.broken
        );
    }

    #[test]
    fn an_acked_message_without_an_effect_is_lost() {
        let mut seen = observed();
        seen.rows.clear();
        let checked = check(&plan(), &seen);
        assert!(
            checked
                .broken
                .iter()
                .any(|b| b.contains("LOST: message b1")),
            "{:?}",
            checked.broken
        );
    }

    #[test]
    fn a_second_effect_needs_a_kill_and_is_counted() {
        let mut seen = observed();
        seen.requests.push(request(
            "a2",
            "a",
            Answer::Success {
                status: 201,
                body: true,
            },
        ));
        assert!(check(&plan(), &seen).broken[0].contains("2 times"));
        seen.faults.push((Duration::from_secs(1), "kill -9".into()));
        let checked = check(&plan(), &seen);
        assert!(checked.broken.is_empty(), "{:?}", checked.broken);
        assert_eq!(checked.summary.extra_effects, 1);
    }
}
