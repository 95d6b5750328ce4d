//! The ledger of `backstop chaos`: what the publisher confirmed against
//! what PostgreSQL recorded (effects, compensation store rows) and what the
//! dead-letter queue holds, per order; time-to-resume per fault; and the
//! gate.
//!
//! - lost: a published order with no effect, no store row and no copy in
//!   the DLQ. Must be 0.
//! - duplicates: effects after an order's first. One is explained when the
//!   instance of the first effect was `kill -9`'d within
//!   [`KILL_WINDOW`] after it: the effect committed, the dedup key was not
//!   marked done and the ack never sent. Any other duplicate fails the gate.
//! - store: every order the endpoint refuses for good has exactly one
//!   unfinished row (or is in the DLQ); no row is re-driven by two scanners
//!   at once (two `replayed` entries in its audit without the failure of the
//!   first copy between them, within the scanner's lease).
//! - consuming: after every fault some instance handled a delivery again,
//!   and every instance running at the end of the load was still handling.
//!
//! Time to resume, per fault: from its start, and from the end of its
//! recovery step, to the first effect after it (any instance: with three
//! consumers it is often milliseconds); and the longest pause in effects
//! from its start to 30 s after its end, which shows how much a fault
//! really stalled the flow.

use super::schedule::Struck;
use backstop::store::AuditEntry;
use backstop_testkit::effects::{Effect, Fate, Fates, LoggedEffect};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};

/// How soon after an effect a `kill -9` of its instance explains a second
/// effect: the handler window between the endpoint's commit and the dedup
/// key marked done (milliseconds; seconds at most when the dedup store is
/// slow).
pub(crate) const KILL_WINDOW_MS: i64 = 5_000;
/// How long before a kill -9 an effect may have committed and still come
/// from a request the killed instance had in flight (the endpoint commits
/// what it received even when the caller is gone).
const IN_FLIGHT_SLACK_MS: i64 = 2_000;
/// The scanner's lease (`ScannerConfig::default`): two re-drives of one row
/// closer than this without a failure between them overlapped.
const SCANNER_LEASE_MS: i64 = 60_000;
/// A confirm or an effect later than this is counted as late.
const LATE_MS: i64 = 10_000;
/// How long after a fault's end its longest pause in effects is looked for.
const PAUSE_TAIL_MS: i64 = 30_000;
/// An instance running through the last this-many ms of the load must have
/// handled something in them.
const STALL_WINDOW_MS: i64 = 30_000;

/// A compensation store row of the run, with its audit trail.
#[derive(Clone, Debug)]
pub(crate) struct RowSeen {
    pub(crate) id: i64,
    pub(crate) order: String,
    pub(crate) status: String,
    pub(crate) finished: bool,
    pub(crate) redrives: i64,
    pub(crate) occurrences: i64,
    pub(crate) audit: Vec<AuditEntry>,
}

/// Everything the run observed.
pub(crate) struct Observed {
    pub(crate) orders: u64,
    pub(crate) fates: Fates,
    pub(crate) confirmed: HashMap<String, i64>,
    /// Each order's first publish, ms since the epoch.
    pub(crate) first_sent: HashMap<String, i64>,
    pub(crate) effects: Vec<Effect>,
    pub(crate) log: Vec<LoggedEffect>,
    pub(crate) rows: Vec<RowSeen>,
    pub(crate) dlq: Vec<String>,
    /// Orders with a copy left in the queue or a tier after the sidecars
    /// stopped: a scanner re-drove its row between the drain and the stop.
    pub(crate) leftovers: Vec<String>,
    pub(crate) faults: Vec<Struck>,
    /// Sidecar pids, to name the scanners in the audit (`scanner-<host>-<pid>-<random>`).
    pub(crate) pids: HashMap<u32, String>,
    pub(crate) instances: Vec<String>,
    pub(crate) start_ms: i64,
    /// When the last message was due.
    pub(crate) load_end_ms: i64,
    pub(crate) drained: bool,
    pub(crate) dedup_lease_s: u64,
}

/// The outcome.
pub(crate) struct Ledger {
    /// `ledger: published=.. effects=.. duplicates=.. dlq=.. stored=.. lost=..`
    pub(crate) line: String,
    /// One line per fault kind: time to resume.
    pub(crate) resume_lines: Vec<String>,
    /// Explanations and store figures, for the terminal.
    pub(crate) notes: Vec<String>,
    /// Why the gate failed; empty when it passed.
    pub(crate) failures: Vec<String>,
    pub(crate) json: serde_json::Value,
}

fn rel(ms: i64, start: i64) -> f64 {
    (ms - start) as f64 / 1000.0
}

/// One fault kind's times (ms): to resume from the start, to resume from
/// the recovery, the longest pause.
type KindTimes = (Vec<i64>, Vec<i64>, Vec<i64>);

/// The median and the maximum of `values` (ms).
fn p50_max(values: &mut [i64]) -> Option<(i64, i64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    Some((values[(values.len() - 1) / 2], values[values.len() - 1]))
}

/// The scanner owner's instance.
fn instance_of_owner(owner: &str, pids: &HashMap<u32, String>) -> String {
    owner
        .rsplit('-')
        .nth(1)
        .and_then(|pid| pid.parse::<u32>().ok())
        .and_then(|pid| pids.get(&pid).cloned())
        .unwrap_or_else(|| owner.to_owned())
}

/// Computes the ledger and the gate.
pub(crate) fn compute(o: &Observed) -> Ledger {
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    let start = o.start_ms;

    let effects: HashMap<&str, &Effect> = o
        .effects
        .iter()
        .map(|e| (e.business_id.as_str(), e))
        .collect();
    let mut rows_of: HashMap<&str, Vec<&RowSeen>> = HashMap::new();
    for row in &o.rows {
        rows_of.entry(row.order.as_str()).or_default().push(row);
    }
    let dlq: HashSet<&str> = o.dlq.iter().map(String::as_str).collect();
    let queued: HashSet<&str> = o.leftovers.iter().map(String::as_str).collect();

    // The ledger line.
    let published = o.confirmed.len();
    let duplicates: i64 = o.effects.iter().map(|e| i64::from(e.duplicates)).sum();
    let lost: Vec<&str> = o
        .confirmed
        .keys()
        .map(String::as_str)
        .filter(|order| {
            // A row counts while it is open: a re-driven (finished) row whose
            // copy never had an effect is a loss after the re-drive.
            let open_row = rows_of
                .get(order)
                .is_some_and(|rows| rows.iter().any(|r| !r.finished));
            // A leftover in a queue counts only beside a row: the copy a
            // scanner re-drove after the drain.
            let redriven_leftover = queued.contains(order) && rows_of.contains_key(order);
            !(effects.contains_key(order) || open_row || dlq.contains(order) || redriven_leftover)
        })
        .collect();
    let line = format!(
        "ledger: published={published} effects={} duplicates={duplicates} dlq={} stored={} lost={}",
        o.effects.len(),
        dlq.len(),
        rows_of.len(),
        lost.len()
    );
    if !lost.is_empty() {
        let mut sample: Vec<&str> = lost.iter().take(10).copied().collect();
        sample.sort_unstable();
        failures.push(format!(
            "{} published orders have no effect, no store row and no DLQ copy: {}",
            lost.len(),
            sample.join(", ")
        ));
    }
    if (published as u64) < o.orders {
        failures.push(format!(
            "only {published} of {} orders were confirmed by the broker",
            o.orders
        ));
    }
    if !o.drained {
        failures.push(
            "the queues did not drain (or not every order was accounted for) before the deadline"
                .to_owned(),
        );
    }

    // Duplicates, each explained or not.
    let kills: Vec<(usize, i64)> = o
        .faults
        .iter()
        .filter_map(|f| Some((f.killed_instance?, f.start_ms)))
        .collect();
    let mut explained = Vec::new();
    let mut unexplained = Vec::new();
    let mut by_order: HashMap<&str, Vec<&LoggedEffect>> = HashMap::new();
    for entry in &o.log {
        by_order
            .entry(entry.business_id.as_str())
            .or_default()
            .push(entry);
    }
    let mut explained_per_kill: HashMap<i64, u32> = HashMap::new();
    let mut duplicated: Vec<&Effect> = o.effects.iter().filter(|e| e.duplicates > 0).collect();
    duplicated.sort_by(|a, b| a.business_id.cmp(&b.business_id));
    for effect in duplicated {
        let history = by_order
            .get(effect.business_id.as_str())
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| format!("{} at +{:.3}s", e.instance, rel(e.at_ms, start)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        // One extra effect, after a kill -9 of the first effect's instance
        // that came within the window after that effect (or while its
        // request was still in flight: the commit may land just after the
        // kill), and at most one per handler slot of the killed instance.
        let mut times: Vec<i64> = by_order
            .get(effect.business_id.as_str())
            .map(|entries| entries.iter().map(|e| e.at_ms).collect())
            .unwrap_or_default();
        times.sort_unstable();
        let kill = kills.iter().find(|(instance, at)| {
            o.instances.get(*instance) == Some(&effect.instance)
                && effect.duplicates == 1
                && *at >= effect.at_ms - IN_FLIGHT_SLACK_MS
                && *at - effect.at_ms <= KILL_WINDOW_MS
                && times.get(1).is_some_and(|second| second >= at)
                && explained_per_kill.get(at).copied().unwrap_or(0) < super::CONCURRENCY
        });
        if let Some((_, at)) = kill {
            *explained_per_kill.entry(*at).or_insert(0) += 1;
        }
        let entry = json!({
            "order": effect.business_id,
            "effects": history,
            "explained": kill.is_some(),
        });
        match kill {
            Some((_, at)) => {
                notes.push(format!(
                    "duplicate explained: order {} (effects: {history}): {} was kill -9'd {} ms after \
                     its effect committed, before it marked the dedup key done and acked; the \
                     broker redelivered the message and it ran again once the {} s dedup lease ran out",
                    effect.business_id,
                    effect.instance,
                    at - effect.at_ms,
                    o.dedup_lease_s
                ));
                explained.push(entry);
            }
            None => {
                failures.push(format!(
                    "unexplained duplicate: order {} (effects: {history}): not one extra effect after \
                     a kill -9 of {} within {KILL_WINDOW_MS} ms after its first effect",
                    effect.business_id, effect.instance
                ));
                unexplained.push(entry);
            }
        }
    }
    if !explained.is_empty() {
        notes.push(
            "the plain dedup mode marks a key done after the effect, in a second write: a kill -9 \
             between the two runs the effect again. For effects in SQL the transactional inbox \
             (backstop::dedup::inbox) commits the effect and the key in one transaction and closes \
             that window."
                .to_owned(),
        );
    }

    // The store.
    let mut refused = 0;
    let mut refused_ok = 0;
    let mut stored_transient = 0;
    for order in o.confirmed.keys() {
        let rows = rows_of
            .get(order.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let open = rows.iter().filter(|r| !r.finished).count();
        match o.fates.of(order) {
            Fate::Refuse => {
                refused += 1;
                if effects.contains_key(order.as_str()) {
                    failures.push(format!(
                        "order {order} is refused for good yet has an effect"
                    ));
                } else if open == 1
                    || (open == 0
                        && (dlq.contains(order.as_str()) || queued.contains(order.as_str())))
                {
                    refused_ok += 1;
                } else {
                    failures.push(format!(
                        "order {order} is refused for good: expected one unfinished store row (or a \
                         DLQ copy), found {open} unfinished of {} rows{}",
                        rows.len(),
                        if dlq.contains(order.as_str()) { " and a DLQ copy" } else { "" }
                    ));
                }
            }
            Fate::Accept | Fate::FailOnce => {
                if !effects.contains_key(order.as_str()) && open > 0 {
                    stored_transient += 1;
                }
            }
        }
    }
    let mut redrives_by_instance: BTreeMap<String, u64> = BTreeMap::new();
    let mut rows_by_several = 0;
    let mut overlaps = Vec::new();
    for row in &o.rows {
        let mut owners = HashSet::new();
        let mut open_replay: Option<(i64, String)> = None;
        for entry in &row.audit {
            match entry.action.as_str() {
                "replayed" => {
                    let instance = instance_of_owner(&entry.actor, &o.pids);
                    *redrives_by_instance.entry(instance.clone()).or_default() += 1;
                    owners.insert(instance.clone());
                    if let Some((at, first)) = &open_replay
                        && entry.at - at < SCANNER_LEASE_MS
                    {
                        overlaps.push(format!(
                            "row {} (order {}): re-driven by {first} at +{:.1}s and by {instance} at \
                             +{:.1}s with no failure of the first copy between",
                            row.id,
                            row.order,
                            rel(*at, start),
                            rel(entry.at, start)
                        ));
                    }
                    open_replay = Some((entry.at, instance));
                }
                "failed_again" | "needs_review" | "redrive_failed" => open_replay = None,
                _ => {}
            }
        }
        if owners.len() > 1 {
            rows_by_several += 1;
        }
    }
    failures.extend(overlaps.iter().cloned());
    let total_redrives: u64 = redrives_by_instance.values().sum();
    notes.push(format!(
        "store: {} rows for {} orders; {refused_ok} of {refused} orders refused for good have exactly \
         one open row; {stored_transient} orders that fail only transiently wait in the store for a \
         re-drive; re-drives {total_redrives} ({}), {rows_by_several} rows re-driven by more than one \
         instance over time, {} at once",
        o.rows.len(),
        rows_of.len(),
        redrives_by_instance
            .iter()
            .map(|(i, n)| format!("{i}={n}"))
            .collect::<Vec<_>>()
            .join(" "),
        overlaps.len()
    ));

    // Time to resume, per fault and per kind.
    let after = |ms: i64| o.log.iter().find(|e| e.at_ms > ms).map(|e| e.at_ms - ms);
    // The longest time without any effect from a fault's start to
    // PAUSE_TAIL_MS after its end (or the end of the load).
    let longest_pause = |from: i64, to: i64| -> Option<i64> {
        let to = to.min(o.load_end_ms);
        if to <= from {
            return None;
        }
        let mut last = from;
        let mut longest = 0;
        for at in o
            .log
            .iter()
            .map(|e| e.at_ms)
            .filter(|&at| at > from && at <= to)
        {
            longest = longest.max(at - last);
            last = at;
        }
        Some(longest.max(to - last))
    };
    let mut per_kind: BTreeMap<&str, KindTimes> = BTreeMap::new();
    let mut faults_json = Vec::new();
    for fault in &o.faults {
        let from_start = after(fault.start_ms);
        let from_recovery = fault.recovered_ms.and_then(after);
        let pause = longest_pause(fault.start_ms, fault.end_ms + PAUSE_TAIL_MS);
        let kind = per_kind.entry(fault.kind).or_default();
        kind.0.extend(from_start);
        kind.1.extend(from_recovery);
        kind.2.extend(pause);
        if let Some(error) = &fault.error {
            failures.push(format!("fault {:?} failed: {error}", fault.label));
        }
        if fault.start_ms < o.load_end_ms && from_start.is_none() {
            failures.push(format!(
                "nothing was handled after the fault {:?} at +{:.1}s",
                fault.label,
                rel(fault.start_ms, start)
            ));
        }
        let instance_resume = fault.killed_instance.and_then(|i| {
            let name = o.instances.get(i)?;
            let ready = fault.recovered_ms?;
            o.log
                .iter()
                .find(|e| &e.instance == name && e.at_ms > ready)
                .map(|e| e.at_ms - ready)
        });
        faults_json.push(json!({
            "kind": fault.kind,
            "label": fault.label,
            "start_s": rel(fault.start_ms, start),
            "recovered_s": fault.recovered_ms.map(|ms| rel(ms, start)),
            "end_s": rel(fault.end_ms, start),
            "resume_from_start_ms": from_start,
            "resume_from_recovery_ms": from_recovery,
            "restarted_instance_resume_ms": instance_resume,
            "longest_pause_ms": pause,
            "error": fault.error,
        }));
    }
    let mut resume_lines = Vec::new();
    let mut resume_json = serde_json::Map::new();
    for (kind, (mut from_start, mut from_recovery, mut pauses)) in per_kind {
        let count = from_start.len();
        let start_stats = p50_max(&mut from_start);
        let recovery_stats = p50_max(&mut from_recovery);
        let pause_stats = p50_max(&mut pauses);
        let show = |s: Option<(i64, i64)>| match s {
            Some((p50, max)) => format!("p50={p50}ms max={max}ms"),
            None => "n/a".to_owned(),
        };
        resume_lines.push(format!(
            "time_to_resume {kind}: from start {} ; from recovery {} ; longest pause {} (n={count})",
            show(start_stats),
            show(recovery_stats),
            show(pause_stats)
        ));
        resume_json.insert(
            kind.to_owned(),
            json!({
                "from_start_p50_ms": start_stats.map(|s| s.0),
                "from_start_max_ms": start_stats.map(|s| s.1),
                "from_recovery_p50_ms": recovery_stats.map(|s| s.0),
                "from_recovery_max_ms": recovery_stats.map(|s| s.1),
                "longest_pause_p50_ms": pause_stats.map(|s| s.0),
                "longest_pause_max_ms": pause_stats.map(|s| s.1),
                "faults": count,
            }),
        );
    }

    // Each instance: effects, the last one, and whether it kept consuming.
    let mut instances_json = serde_json::Map::new();
    for (i, name) in o.instances.iter().enumerate() {
        let mine: Vec<&LoggedEffect> = o.log.iter().filter(|e| &e.instance == name).collect();
        let last = mine.last().map(|e| e.at_ms);
        let window_start = o.load_end_ms - STALL_WINDOW_MS;
        let killed_late = o
            .faults
            .iter()
            .any(|f| f.killed_instance == Some(i) && f.end_ms > window_start);
        let handled_late = mine.iter().any(|e| e.at_ms >= window_start);
        if !killed_late && window_start > start && !handled_late {
            failures.push(format!(
                "{name} handled nothing in the last {} s of the load (its last effect at {}): it \
                 stopped consuming",
                STALL_WINDOW_MS / 1000,
                last.map(|ms| format!("+{:.1}s", rel(ms, start)))
                    .unwrap_or_else(|| "never".to_owned())
            ));
        }
        instances_json.insert(
            name.clone(),
            json!({
                "effects": mine.len(),
                "last_effect_s": last.map(|ms| rel(ms, start)),
            }),
        );
    }

    // Latencies: publish to confirm, confirm to first effect.
    let mut to_confirm: Vec<i64> = o
        .confirmed
        .iter()
        .filter_map(|(order, at)| Some(at - o.first_sent.get(order)?))
        .collect();
    let mut to_effect: Vec<(i64, &str)> = o
        .effects
        .iter()
        .filter_map(|e| {
            Some((
                e.at_ms - o.confirmed.get(&e.business_id)?,
                e.business_id.as_str(),
            ))
        })
        .collect();
    to_effect.sort_unstable();
    let slow_confirms = to_confirm.iter().filter(|ms| **ms > LATE_MS).count();
    let late_effects: Vec<String> = to_effect
        .iter()
        .rev()
        .take_while(|(ms, _)| *ms > LATE_MS)
        .map(|(ms, order)| format!("{order} {:.1}s", *ms as f64 / 1000.0))
        .collect();
    let confirm_stats = p50_max(&mut to_confirm);
    let mut effect_latencies: Vec<i64> = to_effect.iter().map(|(ms, _)| *ms).collect();
    let effect_stats = p50_max(&mut effect_latencies);
    notes.push(format!(
        "latency: publish to confirm p50={}ms max={}ms ({slow_confirms} over {} s); confirm to \
         effect p50={}ms max={}ms ({} over {} s{})",
        confirm_stats.map_or(0, |s| s.0),
        confirm_stats.map_or(0, |s| s.1),
        LATE_MS / 1000,
        effect_stats.map_or(0, |s| s.0),
        effect_stats.map_or(0, |s| s.1),
        late_effects.len(),
        LATE_MS / 1000,
        if late_effects.is_empty() {
            String::new()
        } else {
            format!(
                "; the latest: {}",
                late_effects
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    ));

    let json = json!({
        "latency": {
            "publish_to_confirm_p50_ms": confirm_stats.map(|s| s.0),
            "publish_to_confirm_max_ms": confirm_stats.map(|s| s.1),
            "confirms_over_10s": slow_confirms,
            "confirm_to_effect_p50_ms": effect_stats.map(|s| s.0),
            "confirm_to_effect_max_ms": effect_stats.map(|s| s.1),
            "effects_over_10s_after_confirm": late_effects.len(),
            "latest_effects": late_effects.iter().take(50).collect::<Vec<_>>(),
        },
        "ledger": {
            "published": published,
            "effects": o.effects.len(),
            "duplicates": duplicates,
            "dlq": dlq.len(),
            "stored": rows_of.len(),
            "lost": lost.len(),
        },
        "faults": faults_json,
        "time_to_resume": resume_json,
        "duplicates": {
            "explained": explained,
            "unexplained": unexplained,
        },
        "store": {
            "rows": o.rows.len(),
            "orders": rows_of.len(),
            "refused_orders": refused,
            "refused_with_one_open_row_or_dlq": refused_ok,
            "transient_orders_waiting_in_store": stored_transient,
            "redrives_by_instance": redrives_by_instance,
            "redrives_claimed": o.rows.iter().map(|r| r.redrives).sum::<i64>(),
            "occurrences": o.rows.iter().map(|r| r.occurrences).sum::<i64>(),
            "rows_redriven_by_several_instances": rows_by_several,
            "rows_redriven_by_two_at_once": overlaps,
            "statuses": o.rows.iter().fold(BTreeMap::<String, u64>::new(), |mut m, r| {
                *m.entry(r.status.clone()).or_default() += 1;
                m
            }),
        },
        "instances": instances_json,
        "left_in_queues": queued.len(),
        "drained": o.drained,
        "failures": failures,
        "passed": failures.is_empty(),
    });
    Ledger {
        line,
        resume_lines,
        notes,
        failures,
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            orders: 3,
            fates: Fates {
                seed: 1,
                refuse_per_mille: 0,
                fail_once_per_mille: 0,
            },
            confirmed: ["a", "b", "c"]
                .into_iter()
                .map(|o| (o.to_owned(), 1_000))
                .collect(),
            first_sent: HashMap::new(),
            effects: Vec::new(),
            log: Vec::new(),
            rows: Vec::new(),
            dlq: Vec::new(),
            leftovers: Vec::new(),
            faults: Vec::new(),
            pids: HashMap::new(),
            instances: vec!["i1".into(), "i2".into()],
            start_ms: 0,
            load_end_ms: 10_000,
            drained: true,
            dedup_lease_s: 10,
        }
    }

    fn effect(order: &str, instance: &str, at_ms: i64, duplicates: i32) -> Effect {
        Effect {
            business_id: order.into(),
            instance: instance.into(),
            at_ms,
            duplicates,
        }
    }

    fn logged(order: &str, instance: &str, at_ms: i64) -> LoggedEffect {
        LoggedEffect {
            business_id: order.into(),
            instance: instance.into(),
            at_ms,
        }
    }

    #[test]
    fn an_order_with_no_trace_is_lost() {
        let mut o = observed();
        o.effects = vec![effect("a", "i1", 9_000, 0), effect("b", "i2", 9_500, 0)];
        o.log = vec![logged("a", "i1", 9_000), logged("b", "i2", 9_500)];
        let ledger = compute(&o);
        assert!(ledger.line.ends_with("lost=1"), "{}", ledger.line);
        assert!(
            ledger.failures.iter().any(|f| f.contains(": c")),
            "{:?}",
            ledger.failures
        );
    }

    #[test]
    fn a_duplicate_is_explained_only_by_a_kill_of_its_instance_right_after() {
        let mut o = observed();
        o.effects = vec![
            effect("a", "i2", 5_000, 1),
            effect("b", "i1", 5_000, 1),
            effect("c", "i1", 9_000, 0),
        ];
        o.log = vec![
            logged("a", "i2", 5_000),
            logged("b", "i1", 5_000),
            logged("a", "i1", 7_000),
            logged("b", "i2", 7_000),
            logged("c", "i1", 9_000),
        ];
        o.faults = vec![Struck {
            kind: "sidecar-kill-9",
            label: "kill".into(),
            start_ms: 5_020,
            recovered_ms: Some(6_000),
            end_ms: 6_000,
            killed_instance: Some(1),
            error: None,
        }];
        let ledger = compute(&o);
        assert!(ledger.line.contains("duplicates=2"), "{}", ledger.line);
        assert_eq!(ledger.failures.len(), 1, "{:?}", ledger.failures);
        assert!(
            ledger.failures[0].contains("order b"),
            "{:?}",
            ledger.failures
        );
        assert!(
            ledger.notes.iter().any(|n| n.contains("order a")),
            "{:?}",
            ledger.notes
        );
    }

    #[test]
    fn two_replays_without_a_failure_between_are_an_overlap() {
        let mut o = observed();
        o.effects = ["a", "b", "c"]
            .iter()
            .map(|order| effect(order, "i1", 9_000, 0))
            .collect();
        o.log = vec![logged("a", "i1", 9_000)];
        let entry = |at: i64, actor: &str, action: &str| AuditEntry {
            at,
            actor: actor.into(),
            action: action.into(),
            note: None,
        };
        o.pids = [(11, "i1".to_owned()), (22, "i2".to_owned())].into();
        o.rows = vec![RowSeen {
            id: 1,
            order: "a".into(),
            status: "retrying".into(),
            finished: false,
            redrives: 3,
            occurrences: 1,
            audit: vec![
                entry(1_000, "consumer", "stored"),
                entry(2_000, "scanner-h-11-ab", "replayed"),
                entry(2_100, "consumer", "failed_again"),
                entry(3_000, "scanner-h-22-cd", "replayed"),
                entry(3_500, "scanner-h-11-ab", "replayed"),
            ],
        }];
        let ledger = compute(&o);
        assert_eq!(ledger.failures.len(), 1, "{:?}", ledger.failures);
        assert!(
            ledger.failures[0].contains("by i2"),
            "{:?}",
            ledger.failures
        );
        assert_eq!(ledger.json["store"]["redrives_by_instance"]["i1"], 2);
    }

    #[test]
    fn percentiles() {
        assert_eq!(p50_max(&mut []), None);
        assert_eq!(p50_max(&mut [5, 1, 3]), Some((3, 5)));
        assert_eq!(p50_max(&mut [4, 2]), Some((2, 4)));
    }
}
