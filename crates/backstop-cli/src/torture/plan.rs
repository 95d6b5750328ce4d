//! One round's scenario, drawn from its seed: the orders (business ids) and
//! their fates at the endpoint, the messages that carry them (shapes,
//! duplicates, publish times) and the fault schedule. Everything here is a
//! pure function of the seed, so `--seed` replays the same scenario; only
//! the scheduling of the real processes varies.

use std::time::Duration;

/// The two consumers of every round: one parks exhausted messages in the
/// compensation store, the other in `<queue>.dlq`.
pub(crate) const STORE_CONSUMER: usize = 0;
/// See [`STORE_CONSUMER`].
pub(crate) const DLQ_CONSUMER: usize = 1;

/// The per-message TTL of the messages that carry one.
pub(crate) const MESSAGE_TTL: Duration = Duration::from_secs(5);

/// The length of a "very long" header value.
pub(crate) const LONG_HEADER: usize = 10 * 1024;

/// What `--without` can take out of a round's mix, to look past a known
/// defect for the next one. Leaving something out changes no other draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Without {
    /// 301, 302 and 307 answers to `/landing`.
    Redirect,
    /// 408 and 429 answers, with and without `Retry-After`.
    Throttle,
    /// 500, 502, 503 answers.
    ServerError,
    /// A 503 sent after the client's timeout.
    Slow,
    /// The connection dropped without an answer.
    Reset,
    /// A 200 with a 10 MiB body.
    Big,
    /// Dedup keys that are not UTF-8 (long strings with invalid bytes, in
    /// colliding pairs) or byte arrays: they become plain text keys.
    BinaryKey,
    /// Dedup keys of 3 KB: they become plain text keys.
    LongKey,
}

/// What the endpoint does with an order, whatever message carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The first `failures` requests for the order fail transiently, then
    /// every request succeeds. At most two failures, so the three deliveries
    /// the retry tiers allow always reach a success.
    Succeed { failures: u32 },
    /// Every request fails transiently: the tiers run out and it is parked.
    Exhaust,
    /// A permanent refusal (4xx), possibly after one transient failure.
    Permanent,
}

impl Fate {
    /// True when the order can only end parked.
    pub(crate) fn fails(self) -> bool {
        !matches!(self, Fate::Succeed { .. })
    }
}

/// How a message carries the dedup key header (`x-order-id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyShape {
    /// No header: the message has no dedup key.
    Absent,
    /// A UTF-8 long string.
    Text(String),
    /// A long string with bytes that are not UTF-8.
    Binary(Vec<u8>),
    /// A byte array (field type `x`).
    ByteArray(Vec<u8>),
}

impl KeyShape {
    /// A short description for histories.
    pub(crate) fn describe(&self) -> String {
        match self {
            KeyShape::Absent => "no dedup key".to_owned(),
            KeyShape::Text(s) if s.len() > 64 => format!("text key of {} bytes", s.len()),
            KeyShape::Text(s) => format!("text key {s:?}"),
            KeyShape::Binary(b) => format!("non-UTF-8 long-string key {}", hex(b)),
            KeyShape::ByteArray(b) => format!("byte-array key {}", hex(b)),
        }
    }
}

/// `bytes` as lowercase hex, cut after 32 bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(32).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 32 {
        format!("0x{shown}... ({} bytes)", bytes.len())
    } else {
        format!("0x{shown}")
    }
}

/// One business id.
#[derive(Clone, Debug)]
pub(crate) struct Order {
    /// The business id, also the `order` field of every body carrying it.
    pub(crate) id: String,
    /// Which consumer's queue its messages go to.
    pub(crate) consumer: usize,
    pub(crate) fate: Fate,
    pub(crate) key: KeyShape,
}

impl Order {
    /// The dedup key header's bytes, when the order's messages carry one.
    pub(crate) fn key_bytes(&self) -> Option<&[u8]> {
        match &self.key {
            KeyShape::Absent => None,
            KeyShape::Text(s) => Some(s.as_bytes()),
            KeyShape::Binary(b) | KeyShape::ByteArray(b) => Some(b),
        }
    }
}

/// One message to publish.
#[derive(Clone, Debug)]
pub(crate) struct Message {
    /// Unique per message, duplicates included.
    pub(crate) message_id: String,
    /// Index into [`Plan::orders`].
    pub(crate) order: usize,
    /// When to publish it, from the round's start.
    pub(crate) at: Duration,
    /// Published with `expiration` = [`MESSAGE_TTL`].
    pub(crate) ttl: bool,
    /// Carries a 10 KiB `x-note` header.
    pub(crate) long_note: bool,
    /// A deliberate duplicate: same order, same body, new message id.
    pub(crate) duplicate: bool,
}

/// A fault and when it strikes, from the round's start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Fault {
    /// The proxy closes every connection to the broker.
    Cut,
    /// The proxy stops forwarding for this long.
    Blackhole(Duration),
    /// `kill -9` of the sidecar, restarted after this pause.
    Kill(Duration),
    /// `rabbitmqctl stop_app`, `start_app` after this pause (`--faults all`).
    BrokerRestart(Duration),
    /// A restart of the store's or dedup store's server (`--faults all`).
    StoreRestart,
}

/// Which faults a round may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FaultSet {
    /// No faults: answers and message shapes only.
    None,
    /// Proxy cuts, blackholes and `kill -9` of the sidecar.
    Default,
    /// Also broker restarts and restarts of the store or dedup server.
    All,
}

/// One round's scenario.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) orders: Vec<Order>,
    /// Sorted by publish time.
    pub(crate) messages: Vec<Message>,
    /// Sorted by time.
    pub(crate) faults: Vec<(Duration, Fault)>,
}

/// Draws the scenario of `seed` with `messages` messages (about 10% of
/// them duplicates). `prefix` makes message ids and business ids unique to
/// the round.
pub(crate) fn draw(
    seed: u64,
    messages: u64,
    faults: FaultSet,
    without: &[Without],
    prefix: &str,
) -> Plan {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = messages.max(1) as usize;
    let duplicates = total / 10;
    let originals = total - duplicates;
    // Publishing is spread over a few seconds, so that faults hit messages
    // at every stage: queued, in a handler, in a retry tier, being parked.
    let spread_ms = (originals as u64 * 60).clamp(500, 5_000);

    let mut orders: Vec<Order> = Vec::with_capacity(originals);
    let mut plan_messages = Vec::with_capacity(total);
    let mut pair_pending: Option<(usize, Vec<u8>)> = None;
    for n in 0..originals {
        let id = format!("{prefix}-o{n}");
        let consumer = if rng.bool() {
            STORE_CONSUMER
        } else {
            DLQ_CONSUMER
        };
        let fate = match rng.u32(0..100) {
            0..=39 => Fate::Succeed { failures: 0 },
            40..=64 => Fate::Succeed { failures: 1 },
            65..=79 => Fate::Succeed { failures: 2 },
            80..=89 => Fate::Permanent,
            _ => Fate::Exhaust,
        };
        let mut order = Order {
            id: id.clone(),
            consumer,
            fate,
            key: KeyShape::Text(id.clone()),
        };
        match rng.u32(0..100) {
            0..=9 => order.key = KeyShape::Absent,
            10..=13 => order.key = KeyShape::ByteArray(format!("b-{id}").into_bytes()),
            14..=17 => {
                // A long key past PostgreSQL's btree limit of about 2.7 KB,
                // drawn at random so that compression cannot shrink it.
                let mut key = format!("{id}-");
                key.extend(std::iter::repeat_with(|| rng.alphanumeric()).take(3_000));
                order.key = KeyShape::Text(key);
            }
            18..=25 => {
                // Non-UTF-8 keys in pairs that differ only in their invalid
                // byte, on one consumer and both succeeding: two business
                // ids that a lossy decoding would merge into one key.
                match pair_pending.take() {
                    Some((first, shared)) if orders[first].consumer == consumer => {
                        let mut key = vec![0xfe];
                        key.extend_from_slice(&shared);
                        order.key = KeyShape::Binary(key);
                        order.fate = Fate::Succeed { failures: 0 };
                        orders[first].fate = Fate::Succeed { failures: 0 };
                    }
                    // No partner waiting on this consumer: start a pair (an
                    // earlier lone key stays a lone non-UTF-8 key).
                    _ => {
                        let shared = format!("pair-{id}").into_bytes();
                        let mut key = vec![0xff];
                        key.extend_from_slice(&shared);
                        order.key = KeyShape::Binary(key);
                        pair_pending = Some((n, shared));
                    }
                }
            }
            _ => {}
        }
        let binary = matches!(order.key, KeyShape::Binary(_) | KeyShape::ByteArray(_));
        let long = matches!(&order.key, KeyShape::Text(k) if k.len() > 64);
        if (binary && without.contains(&Without::BinaryKey))
            || (long && without.contains(&Without::LongKey))
        {
            order.key = KeyShape::Text(id.clone());
        }
        orders.push(order);
        plan_messages.push(Message {
            message_id: format!("{prefix}-m{n}"),
            order: n,
            at: Duration::from_millis(rng.u64(0..=spread_ms)),
            ttl: rng.u32(0..100) < 10,
            long_note: rng.u32(0..100) < 10,
            duplicate: false,
        });
    }
    for d in 0..duplicates {
        let original = plan_messages[rng.usize(0..originals)].clone();
        plan_messages.push(Message {
            message_id: format!("{prefix}-d{d}"),
            at: original.at + Duration::from_millis(rng.u64(300..=6_000)),
            duplicate: true,
            ..original
        });
    }
    plan_messages.sort_by_key(|m| m.at);

    let mut schedule = Vec::new();
    if faults != FaultSet::None {
        let window = spread_ms + 4_000;
        let count = rng.usize(1..=3);
        let mut at = 0;
        for _ in 0..count {
            at += rng.u64(500..=window / count as u64);
            let fault = match (faults, rng.u32(0..100)) {
                (_, 0..=39) => Fault::Cut,
                (_, 40..=64) => Fault::Blackhole(Duration::from_millis(rng.u64(2_000..=4_000))),
                (FaultSet::All, 85..=92) => {
                    Fault::BrokerRestart(Duration::from_millis(rng.u64(1_000..=3_000)))
                }
                (FaultSet::All, 93..) => Fault::StoreRestart,
                _ => Fault::Kill(Duration::from_millis(rng.u64(100..=1_000))),
            };
            schedule.push((Duration::from_millis(at), fault));
        }
    }
    Plan {
        orders,
        messages: plan_messages,
        faults: schedule,
    }
}

/// FNV-1a: a hash that stays the same across Rust releases, so that an
/// answer drawn from it replays with the seed.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_scenario() {
        let a = draw(42, 60, FaultSet::Default, &[], "p");
        let b = draw(42, 60, FaultSet::Default, &[], "p");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let c = draw(43, 60, FaultSet::Default, &[], "p");
        assert_ne!(format!("{a:?}"), format!("{c:?}"));
    }

    #[test]
    fn a_tenth_are_duplicates_and_binary_keys_come_in_colliding_pairs() {
        let plan = draw(7, 200, FaultSet::Default, &[], "p");
        assert_eq!(plan.messages.len(), 200);
        assert_eq!(plan.messages.iter().filter(|m| m.duplicate).count(), 20);
        let binary: Vec<&Order> = plan
            .orders
            .iter()
            .filter(|o| matches!(o.key, KeyShape::Binary(_)))
            .collect();
        for order in &binary {
            let KeyShape::Binary(key) = &order.key else {
                continue;
            };
            assert!(std::str::from_utf8(key).is_err());
        }
        let pairs = binary
            .iter()
            .filter(|o| matches!(&o.key, KeyShape::Binary(k) if k[0] == 0xfe))
            .count();
        assert!(pairs > 0, "seed 7 draws at least one colliding pair");
        assert!(
            plan.faults
                .iter()
                .all(|(_, f)| matches!(f, Fault::Cut | Fault::Blackhole(_) | Fault::Kill(_)))
        );
    }
}
