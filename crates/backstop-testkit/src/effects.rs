//! The effects endpoint of `backstop chaos`: a small HTTP service that takes
//! the sidecars' POSTs and records each EFFECT in PostgreSQL, so that
//! "exactly once" is a query and not a log grep.
//!
//! An effect is one statement: an insert into `chaos_effects` keyed by
//! `(run, business_id)` that counts a repeat in `duplicates`, together with
//! one `chaos_effect_log` row (who, when) per 2xx, to explain a duplicate.
//! The 2xx is sent only after that statement committed; when PostgreSQL
//! fails the answer is 503, so a database restart makes the sidecar retry
//! and never lose.
//!
//! Each sidecar instance posts to its own path, `/in/<instance>`. The
//! business id is the `order` field of the JSON body. A seeded fraction of
//! orders is refused for good (422) and another fails once (503, then 2xx):
//! see [`Fates`].

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
pub use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The tables, created when missing.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS chaos_effects (
        run TEXT NOT NULL,
        business_id TEXT NOT NULL,
        instance TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        duplicates INT NOT NULL DEFAULT 0,
        PRIMARY KEY (run, business_id))",
    "CREATE TABLE IF NOT EXISTS chaos_effect_log (
        id BIGSERIAL PRIMARY KEY,
        run TEXT NOT NULL,
        business_id TEXT NOT NULL,
        instance TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL)",
    "CREATE INDEX IF NOT EXISTS chaos_effect_log_run ON chaos_effect_log (run, at)",
];

/// The effect: the first one inserts, a repeat counts a duplicate; either
/// way one log row. One statement, so one commit.
const RECORD: &str = "WITH effect AS (
        INSERT INTO chaos_effects (run, business_id, instance, at)
        VALUES ($1, $2, $3, clock_timestamp())
        ON CONFLICT (run, business_id)
        DO UPDATE SET duplicates = chaos_effects.duplicates + 1
        RETURNING 1)
    INSERT INTO chaos_effect_log (run, business_id, instance, at)
    SELECT $1, $2, $3, clock_timestamp() FROM effect";

/// What the endpoint does with an order, drawn from the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// 2xx on the first request.
    Accept,
    /// 503 on the first request, 2xx after.
    FailOnce,
    /// 422 on every request: the sidecar parks it (store or DLQ).
    Refuse,
}

/// The seeded mix of fates: per mille of orders refused for good and
/// failing once; the rest are accepted at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fates {
    /// The seed.
    pub seed: u64,
    /// Orders refused for good, per mille.
    pub refuse_per_mille: u32,
    /// Orders that fail once, per mille.
    pub fail_once_per_mille: u32,
}

impl Fates {
    /// The fate of `business_id`: a pure function of the seed and the id.
    pub fn of(&self, business_id: &str) -> Fate {
        let draw = (stable_hash(self.seed, business_id.as_bytes()) % 1000) as u32;
        if draw < self.refuse_per_mille {
            Fate::Refuse
        } else if draw < self.refuse_per_mille + self.fail_once_per_mille {
            Fate::FailOnce
        } else {
            Fate::Accept
        }
    }
}

/// FNV-1a over the seed and the bytes, then a final mix: stable across
/// builds and platforms, unlike `std`'s hasher.
fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Counters of what the endpoint answered.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// 2xx answers: effects committed (first ones and repeats).
    pub effects: AtomicU64,
    /// 422 answers.
    pub refused: AtomicU64,
    /// 503 answers of a fail-once order's first request.
    pub failed_once: AtomicU64,
    /// 503 answers because PostgreSQL failed.
    pub database_errors: AtomicU64,
    /// 400 answers: no business id in the body.
    pub unreadable: AtomicU64,
    /// Requests being answered now.
    pub busy: AtomicU64,
}

struct Shared {
    pool: PgPool,
    run: String,
    fates: Fates,
    /// Fail-once orders already failed.
    failed: Mutex<HashSet<String>>,
    stats: Arc<EndpointStats>,
}

/// The running endpoint. Stops when dropped.
#[derive(Debug)]
pub struct EffectsEndpoint {
    addr: SocketAddr,
    stats: Arc<EndpointStats>,
    task: JoinHandle<()>,
}

impl Drop for EffectsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pool on `url` with short timeouts, so that a request during a database
/// restart fails fast (503) instead of hanging past the sidecar's timeout.
pub async fn connect(url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(2))
        .connect(url)
        .await
}

/// `url` (a `postgres://` URL) naming database `name` instead, created
/// first when missing (the URL's role needs CREATEDB).
pub async fn database_of_its_own(url: &str, name: &str) -> Result<String, String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let Some(slash) = base[scheme_end..].find('/').map(|i| i + scheme_end) else {
        // The URL is not shown: it may carry a password.
        return Err(
            "the PostgreSQL URL names no database (postgres://user:***@host:port/DATABASE)"
                .to_owned(),
        );
    };
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{name:?} is not a plain database name"));
    }
    let pool = connect(url)
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&pool)
            .await
            .map_err(|e| format!("looking for database {name}: {e}"))?;
    if !exists
        && let Err(e) = sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
    {
        // Another run may have created it meanwhile.
        let raced = e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| code == "42P04" || code == "23505");
        if !raced {
            return Err(format!("creating database {name}: {e}"));
        }
    }
    pool.close().await;
    Ok(match query {
        Some(query) => format!("{}/{name}?{query}", &base[..slash]),
        None => format!("{}/{name}", &base[..slash]),
    })
}

/// Creates the effects tables when missing.
pub async fn ensure_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    for statement in SCHEMA {
        sqlx::query(statement).execute(pool).await?;
    }
    Ok(())
}

impl EffectsEndpoint {
    /// Creates the tables when missing and serves on an ephemeral port of
    /// 127.0.0.1, recording effects of `run` in `pool`'s database.
    pub async fn start(pool: PgPool, run: &str, fates: Fates) -> Result<Self, String> {
        ensure_schema(&pool)
            .await
            .map_err(|e| format!("creating the effects tables: {e}"))?;
        let stats = Arc::new(EndpointStats::default());
        let shared = Arc::new(Shared {
            pool,
            run: run.to_owned(),
            fates,
            failed: Mutex::new(HashSet::new()),
            stats: stats.clone(),
        });
        let app = Router::new()
            .route("/in/{instance}", post(receive))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("binding the effects endpoint: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("the effects endpoint's address: {e}"))?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the effects endpoint stopped");
            }
        });
        Ok(EffectsEndpoint { addr, stats, task })
    }

    /// The URL instance `instance` posts to.
    pub fn url(&self, instance: &str) -> String {
        format!("http://{}/in/{instance}", self.addr)
    }

    /// What it answered so far.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }
}

/// Decrements `busy` when the request is answered, however it ends.
struct Busy<'a>(&'a AtomicU64);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    body: Bytes,
) -> StatusCode {
    let stats = &shared.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.busy.fetch_add(1, Ordering::Relaxed);
    let _busy = Busy(&stats.busy);
    let Some(order) = business_id(&body) else {
        stats.unreadable.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    match shared.fates.of(&order) {
        Fate::Refuse => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return StatusCode::UNPROCESSABLE_ENTITY;
        }
        Fate::FailOnce => {
            let first = shared
                .failed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(order.clone());
            if first {
                stats.failed_once.fetch_add(1, Ordering::Relaxed);
                return StatusCode::SERVICE_UNAVAILABLE;
            }
        }
        Fate::Accept => {}
    }
    match sqlx::query(RECORD)
        .bind(&shared.run)
        .bind(&order)
        .bind(&instance)
        .execute(&shared.pool)
        .await
    {
        Ok(_) => {
            stats.effects.fetch_add(1, Ordering::Relaxed);
            StatusCode::OK
        }
        Err(e) => {
            stats.database_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, %order, "recording the effect failed: 503");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// The `order` string of a JSON body.
pub fn business_id(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("order")?
        .as_str()
        .map(str::to_owned)
}

/// One business id's effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effect {
    /// The business id.
    pub business_id: String,
    /// The instance of the first effect.
    pub instance: String,
    /// When the first effect committed, ms since the epoch.
    pub at_ms: i64,
    /// Effects after the first.
    pub duplicates: i32,
}

/// One 2xx answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEffect {
    /// The business id.
    pub business_id: String,
    /// Who posted it.
    pub instance: String,
    /// When it committed, ms since the epoch.
    pub at_ms: i64,
}

/// Every business id's effect in `run`.
pub async fn effects(pool: &PgPool, run: &str) -> Result<Vec<Effect>, sqlx::Error> {
    let rows: Vec<(String, String, i64, i32)> = sqlx::query_as(
        "SELECT business_id, instance, (extract(epoch FROM at) * 1000)::bigint, duplicates
         FROM chaos_effects WHERE run = $1",
    )
    .bind(run)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(business_id, instance, at_ms, duplicates)| Effect {
            business_id,
            instance,
            at_ms,
            duplicates,
        })
        .collect())
}

/// Every 2xx answer of `run`, oldest first.
pub async fn effect_log(pool: &PgPool, run: &str) -> Result<Vec<LoggedEffect>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT business_id, instance, (extract(epoch FROM at) * 1000)::bigint
         FROM chaos_effect_log WHERE run = $1 ORDER BY at, id",
    )
    .bind(run)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(business_id, instance, at_ms)| LoggedEffect {
            business_id,
            instance,
            at_ms,
        })
        .collect())
}

/// How many business ids of `run` have an effect.
pub async fn effect_count(pool: &PgPool, run: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM chaos_effects WHERE run = $1")
        .bind(run)
        .fetch_one(pool)
        .await
}

/// Deletes `run`'s effects.
pub async fn forget_run(pool: &PgPool, run: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM chaos_effect_log WHERE run = $1")
        .bind(run)
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM chaos_effects WHERE run = $1")
        .bind(run)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_follow_the_seed_and_the_shares() {
        let fates = Fates {
            seed: 7,
            refuse_per_mille: 20,
            fail_once_per_mille: 50,
        };
        let drawn: Vec<Fate> = (0..10_000).map(|i| fates.of(&format!("o-{i}"))).collect();
        let again: Vec<Fate> = (0..10_000).map(|i| fates.of(&format!("o-{i}"))).collect();
        assert_eq!(drawn, again);
        let count = |f: Fate| drawn.iter().filter(|d| **d == f).count();
        assert!(
            (120..=280).contains(&count(Fate::Refuse)),
            "{}",
            count(Fate::Refuse)
        );
        assert!(
            (380..=620).contains(&count(Fate::FailOnce)),
            "{}",
            count(Fate::FailOnce)
        );
        let other = Fates { seed: 8, ..fates };
        assert_ne!(
            drawn,
            (0..10_000)
                .map(|i| other.of(&format!("o-{i}")))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_business_id_is_the_order_field() {
        assert_eq!(
            business_id(br#"{"order":"r-1","note":"x"}"#).as_deref(),
            Some("r-1")
        );
        assert_eq!(business_id(br#"{"order":1}"#), None);
        assert_eq!(business_id(b"not json"), None);
    }
}
