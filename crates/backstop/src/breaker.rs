//! The circuit breaker: when the downstream keeps failing, stop taking
//! deliveries instead of burning every message's retries.
//!
//! It watches the last `window` handler results (transient failures count;
//! permanent failures are about the message, not the downstream, and do not).
//! With at least `min_calls` results and a failure ratio at or above
//! `failure_ratio`, it opens: the consumer drains and closes its channel, so
//! unfinished messages go back to the queue untouched. After `cooldown` it
//! half-opens: the consumer subscribes again with a prefetch of one and one
//! handler at a time. `successes_to_close` successes close it; a failure opens
//! it again. While it is not closed, transient failures are requeued without
//! spending a retry attempt, so no message is dead-lettered because the
//! breaker is open.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When the breaker trips and how it recovers. Off unless configured.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// How many recent results are considered.
    pub window: usize,
    /// No decision before this many results.
    pub min_calls: usize,
    /// Trip at or above this share of failures (0.0 to 1.0).
    pub failure_ratio: f64,
    /// How long to stay open before probing.
    pub cooldown: Duration,
    /// Successful probes needed to close again.
    pub successes_to_close: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            min_calls: 10,
            failure_ratio: 0.5,
            cooldown: Duration::from_secs(5),
            successes_to_close: 3,
        }
    }
}

impl BreakerConfig {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |key, reason: &str| {
            Err(crate::Error::Config {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.window == 0 || self.min_calls == 0 || self.min_calls > self.window {
            return bad(
                "breaker.min_calls",
                "window and min_calls must be at least 1, min_calls at most window",
            );
        }
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return bad("breaker.failure_ratio", "must be above 0 and at most 1");
        }
        if self.cooldown.is_zero() {
            return bad("breaker.cooldown", "must be above zero");
        }
        if self.successes_to_close == 0 {
            return bad("breaker.successes_to_close", "must be at least 1");
        }
        Ok(())
    }
}

/// Where the breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Normal consumption.
    Closed,
    /// Not consuming until the cooldown ends.
    Open,
    /// Probing with one delivery at a time.
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    config: BreakerConfig,
    results: VecDeque<bool>,
    failures: usize,
    state: BreakerState,
    opened_at: Option<Instant>,
    probe_successes: u32,
}

impl CircuitBreaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            results: VecDeque::new(),
            failures: 0,
            state: BreakerState::Closed,
            opened_at: None,
            probe_successes: 0,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    pub(crate) fn cooldown(&self) -> Duration {
        self.config.cooldown
    }

    /// Records one result; returns the new state if it changed.
    pub(crate) fn record(&mut self, success: bool, now: Instant) -> Option<BreakerState> {
        match self.state {
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                if success {
                    self.probe_successes += 1;
                    if self.probe_successes >= self.config.successes_to_close {
                        self.results.clear();
                        self.failures = 0;
                        return self.set(BreakerState::Closed, now);
                    }
                    None
                } else {
                    self.set(BreakerState::Open, now)
                }
            }
            BreakerState::Closed => {
                self.results.push_back(success);
                if !success {
                    self.failures += 1;
                }
                if self.results.len() > self.config.window
                    && let Some(oldest) = self.results.pop_front()
                    && !oldest
                {
                    self.failures -= 1;
                }
                let calls = self.results.len();
                // Only a failure trips it: a success never makes things worse.
                if !success
                    && calls >= self.config.min_calls
                    && self.failures as f64 >= self.config.failure_ratio * calls as f64
                {
                    return self.set(BreakerState::Open, now);
                }
                None
            }
        }
    }

    /// Moves from open to half-open once the cooldown has passed.
    pub(crate) fn poll_cooldown(&mut self, now: Instant) -> Option<BreakerState> {
        match (self.state, self.opened_at) {
            (BreakerState::Open, Some(at)) if now >= at + self.config.cooldown => {
                self.set(BreakerState::HalfOpen, now)
            }
            _ => None,
        }
    }

    fn set(&mut self, state: BreakerState, now: Instant) -> Option<BreakerState> {
        self.state = state;
        self.probe_successes = 0;
        self.opened_at = (state == BreakerState::Open).then_some(now);
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            window: 10,
            min_calls: 4,
            failure_ratio: 0.5,
            cooldown: Duration::from_secs(2),
            successes_to_close: 2,
        })
    }

    #[test]
    fn trips_at_the_ratio_once_enough_calls_were_seen() {
        let now = Instant::now();
        let mut b = breaker();
        assert_eq!(b.record(false, now), None);
        assert_eq!(b.record(false, now), None);
        assert_eq!(b.record(false, now), None, "below min_calls");
        assert_eq!(b.record(true, now), None, "a success never trips it");
        assert_eq!(
            b.record(false, now),
            Some(BreakerState::Open),
            "4 of 5 failed"
        );
    }

    #[test]
    fn opens_cools_down_half_opens_and_closes_on_success() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(false, now);
        }
        assert_eq!(b.record(false, now), Some(BreakerState::Open));
        assert_eq!(b.record(true, now), None, "results while open are ignored");
        assert_eq!(b.poll_cooldown(now + Duration::from_secs(1)), None);
        assert_eq!(
            b.poll_cooldown(now + Duration::from_secs(2)),
            Some(BreakerState::HalfOpen)
        );
        assert_eq!(b.record(true, now), None);
        assert_eq!(b.record(true, now), Some(BreakerState::Closed));
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..4 {
            b.record(false, now);
        }
        b.poll_cooldown(now + Duration::from_secs(5));
        assert_eq!(b.record(false, now), Some(BreakerState::Open));
    }

    #[test]
    fn old_results_leave_the_window() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..4 {
            b.record(true, now);
        }
        b.record(false, now);
        b.record(false, now);
        b.record(false, now);
        // 3 failures in 7 calls: still closed.
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..3 {
            b.record(true, now);
        }
        // The window now holds 10: 3 failures, ratio 0.3.
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.record(false, now), None);
        assert_eq!(b.record(false, now), Some(BreakerState::Open));
    }

    #[test]
    fn bad_configs_are_named() {
        let bad = BreakerConfig {
            failure_ratio: 0.0,
            ..BreakerConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(BreakerConfig::default().validate().is_ok());
    }
}
