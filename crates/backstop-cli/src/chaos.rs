//! `backstop chaos`: three sidecars on the three-node cluster of
//! `scripts/cluster.sh`, one shared state, a named fault schedule, a ledger
//! and a picture.
//!
//! - Three `backstop run` children (see [`crate::sidecar`]), instance `i`
//!   connecting through the fault proxy of node `i` with the other two
//!   proxies as failover `broker.addresses`; each declares the run's quorum
//!   queue `chaos.<run>.orders` (all three nodes), its retry tiers and DLQ.
//! - One compensation store in PostgreSQL database `backstop_chaos` (its
//!   own: a scanner re-drives every due row of its queue there), scanned by
//!   all three; dedup on PostgreSQL or Redis with a 10 s lease.
//! - The effects endpoint of the test kit
//!   ([`backstop_testkit::effects`]): each effect is a row in
//!   `chaos_effects`, unique per order.
//! - Orders published with confirms at a fixed rate for the whole load (see
//!   [`publisher`]); the schedule's faults at fixed offsets (see
//!   [`schedule`]).
//! - Then: wait until the queues drain and every order is accounted for,
//!   stop the sidecars, read PostgreSQL and the DLQ, and print the ledger
//!   (see [`ledger`]); write a JSON report and an SVG (see [`plot`]).
//!
//! Exit 0 when the gate holds (`lost=0`, every duplicate effect explained,
//! the store's expectations), 1 otherwise, 2 for usage errors or a cluster
//! that is not up.

mod ledger;
mod plot;
mod publisher;
mod schedule;

use crate::UsageError;
use crate::servers::forget_rows;
use crate::sidecar::{Sidecar, free_port, write_private};
use anyhow::Context;
use backstop::config::Config;
use backstop::retry::{RetryPolicy, now_ms};
use backstop::store::{CompensationStore, ListFilter, SqlStore};
use backstop_testkit::effects::{self, EffectsEndpoint, Fates};
use backstop_testkit::{FaultProxy, cluster, url_via};
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use schedule::{MIN_GAP, Rig, ScheduleName};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The database of the run's store, dedup keys and effects.
const DATABASE: &str = "backstop_chaos";
/// The sidecars' HTTP timeout.
const HTTP_TIMEOUT: &str = "2s";
/// The retry tiers: together longer than a PostgreSQL restart.
const TIERS: [&str; 3] = ["200ms", "1s", "5s"];
/// Handler slots per sidecar: the bound on effects a `kill -9` can repeat.
const CONCURRENCY: u32 = 4;
const PREFETCH: u16 = 20;
/// The dedup claim lease, seconds: short, so that the claims of a killed
/// sidecar free up within the run.
const DEDUP_LEASE_S: u64 = 10;
/// Orders the endpoint refuses for good, per mille.
const REFUSE_PER_MILLE: u32 = 10;
/// Orders that fail once, per mille.
const FAIL_ONCE_PER_MILLE: u32 = 50;

/// Where the dedup keys of `backstop chaos` go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ChaosDedup {
    /// PostgreSQL, database `backstop_chaos`.
    Postgres,
    /// The Redis named by `BACKSTOP_REDIS_URL` (or 127.0.0.1:6379).
    Redis,
}

/// Options of `backstop chaos`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// `short`: the leader's node stopped and started, a sidecar kill -9 and
    /// restart, 5,000 orders (CI). `full`: the whole fault matrix.
    #[arg(long, value_enum, default_value = "short")]
    schedule: ScheduleName,
    /// The dedup store of the three sidecars.
    #[arg(long, value_enum, default_value = "postgres")]
    dedup: ChaosDedup,
    /// Orders to publish (default: the schedule's load length times --rate;
    /// 5,000 for short at the default rate).
    #[arg(long)]
    orders: Option<u64>,
    /// Orders per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// The seed of the endpoint's answers and the deliberate duplicates
    /// (default: random; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the JSON report goes.
    #[arg(long, value_name = "PATH", default_value = "target/chaos/report.json")]
    json: PathBuf,
    /// Where the SVG picture goes.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "target/chaos/throughput.svg"
    )]
    plot: PathBuf,
}

/// `backstop chaos`.
pub(crate) async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    if args.rate == 0 || args.rate > 1_000 {
        return Err(UsageError(format!(
            "--rate {} is out of range: use 1 to 1000 orders per second",
            args.rate
        ))
        .into());
    }
    let load = schedule::load_length(args.schedule);
    let orders = args.orders.unwrap_or(u64::from(args.rate) * load.as_secs());
    if orders == 0 || orders > 500_000 {
        return Err(UsageError(format!(
            "--orders {orders} is out of range: use 1 to 500000"
        ))
        .into());
    }
    check_cluster().await?;
    // reqwest is built without a crypto provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..u64::MAX / 2));
    let run = format!("r{}", now_ms() % 10_000_000_000);
    let queue = format!("chaos.{run}.orders");
    let instances: Vec<String> = (1..=3).map(|i| format!("i{i}")).collect();
    println!(
        "chaos: run={run} seed={seed} schedule={} dedup={} orders={orders} rate={}/s queue={queue}",
        crate::torture::enum_name(args.schedule),
        crate::torture::enum_name(args.dedup),
        args.rate
    );

    // One database for the store, the dedup keys and the effects.
    let database = effects::database_of_its_own(&backstop_testkit::postgres_url(), DATABASE)
        .await
        .map_err(anyhow::Error::msg)?;
    let store = SqlStore::connect(&database)
        .await
        .context("opening the compensation store")?;
    let dedup_url = match args.dedup {
        ChaosDedup::Postgres => database.clone(),
        ChaosDedup::Redis => backstop_testkit::redis_url(),
    };
    // Its schema before three sidecars race to create it.
    backstop::dedup::connect(&dedup_url)
        .await
        .context("opening the dedup store")?;
    let pool = effects::connect(&database)
        .await
        .context("connecting to the effects database")?;
    let fates = Fates {
        seed,
        refuse_per_mille: REFUSE_PER_MILLE,
        fail_once_per_mille: FAIL_ONCE_PER_MILLE,
    };
    let endpoint = EffectsEndpoint::start(pool.clone(), &run, fates)
        .await
        .map_err(anyhow::Error::msg)?;

    let mut proxies = Vec::new();
    for n in cluster::NODES {
        proxies.push(
            FaultProxy::start(cluster::node_addr(n))
                .await
                .with_context(|| format!("starting the fault proxy of node {n}"))?,
        );
    }
    let dir = std::env::temp_dir().join(format!("backstop-chaos-{run}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let proxy_url = |i: usize| url_via(&cluster::node_url(i as u8 + 1), proxies[i].addr());
    let mut sidecars = Vec::new();
    let mut must_drain = Vec::new();
    for (i, name) in instances.iter().enumerate() {
        let others: Vec<String> = (0..3).filter(|&j| j != i).map(proxy_url).collect();
        let port = free_port()?;
        let text = sidecar_config(&SidecarSettings {
            name,
            uri: &proxy_url(i),
            addresses: &others,
            store: &database,
            dedup: &dedup_url,
            queue: &queue,
            endpoint: &endpoint.url(name),
            metrics_port: port,
        });
        if i == 0 {
            let config = Config::parse(&text, "chaos sidecar config")
                .context("the generated sidecar configuration")?;
            let policy = config.consumers[0].retry.policy();
            must_drain.push(queue.clone());
            must_drain.extend(policy.tier_queues(&queue));
        }
        let path = dir.join(format!("{name}.toml"));
        write_private(&path, &text)?;
        sidecars.push(Sidecar::new(path, dir.join(format!("{name}.log")), port));
    }
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    for sidecar in &mut sidecars {
        sidecar.start().await?;
    }
    let mut pids: HashMap<u32, String> = HashMap::new();
    let note_pids = |sidecars: &[Sidecar], pids: &mut HashMap<u32, String>| {
        for (sidecar, name) in sidecars.iter().zip(&instances) {
            if let Some(pid) = sidecar.pid() {
                pids.insert(pid, name.clone());
            }
        }
    };
    note_pids(&sidecars, &mut pids);
    let name = queue.clone();
    let members = tokio::task::spawn_blocking(move || cluster::members(&name)).await?;
    let members = members.map(|(m, _)| m).unwrap_or_default();
    println!(
        "chaos: {queue} is a quorum queue on nodes {members:?}; sidecars i1..i3 via proxies {}; logs in {}",
        proxies
            .iter()
            .map(|p| p.addr().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        dir.display()
    );
    anyhow::ensure!(
        members.len() == 3,
        "{queue} has members {members:?}, not all three nodes"
    );

    // The load and the faults.
    let messages = publisher::plan(&run, orders, args.rate, seed);
    let last_due = messages.last().map(|m| m.at).unwrap_or_default();
    let start = Instant::now();
    let start_ms = now_ms() as i64;
    let load_end_ms = start_ms + last_due.as_millis() as i64;
    let publishing = tokio::spawn(publisher::publish(
        messages,
        queue.clone(),
        start,
        start + last_due + Duration::from_secs(180),
    ));
    let redis_port = reqwest::Url::parse(&backstop_testkit::redis_url())
        .ok()
        .and_then(|u| u.port())
        .unwrap_or(6379);
    let mut struck = Vec::new();
    {
        let mut rig = Rig {
            proxies: &proxies,
            sidecars: &mut sidecars,
            queue: &queue,
            redis_port,
        };
        let mut not_before = start;
        for step in schedule::steps(args.schedule) {
            tokio::time::sleep_until((start + step.at).max(not_before).into()).await;
            let fault = schedule::strike(step.fault, &mut rig).await;
            println!(
                "chaos: +{:.1}s {}: {} ({:.1}s){}",
                (fault.start_ms - start_ms) as f64 / 1000.0,
                fault.kind,
                fault.label,
                (fault.end_ms - fault.start_ms) as f64 / 1000.0,
                fault
                    .error
                    .as_ref()
                    .map(|e| format!(" FAILED: {e}"))
                    .unwrap_or_default()
            );
            let failed = fault.error.is_some();
            struck.push(fault);
            not_before = Instant::now() + MIN_GAP;
            if failed {
                println!("chaos: the schedule stops here");
                break;
            }
        }
    }
    note_pids(&sidecars, &mut pids);
    restore_cluster().await;
    let published = publishing.await.context("the publishing task failed")?;
    println!(
        "chaos: publishing done: {} of {orders} orders confirmed, {} publishes ({} again after a \
         failure: {} nacks, {} confirm errors, {} confirm timeouts, {} publish errors), {} connections",
        published.confirmed.len(),
        published.publishes,
        published.republished,
        published.nacks,
        published.confirm_errors,
        published.confirm_timeouts,
        published.publish_errors,
        published.connections
    );

    let drain_deadline = Instant::now()
        + match args.schedule {
            ScheduleName::Short => Duration::from_secs(60),
            ScheduleName::Full => Duration::from_secs(150),
        };
    let drained = drain(
        &must_drain,
        &dlq,
        &sidecars,
        &endpoint,
        &pool,
        &run,
        &store,
        &queue,
        &published.confirmed,
        drain_deadline,
    )
    .await?;
    let shutdown: Vec<String> = futures_util::future::join_all(
        sidecars
            .iter_mut()
            .zip(&instances)
            .map(|(s, name)| async move { s.stop().await.map(|e| format!("{name}: {e}")) }),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    let end_ms = now_ms() as i64;

    // What is left in the broker and what PostgreSQL says.
    let (dlq_orders, leftovers) = read_parked(&dlq, &must_drain).await?;
    let rows = read_rows(&store, &queue).await?;
    let effects_seen = effects::effects(&pool, &run)
        .await
        .context("reading the effects")?;
    let log = effects::effect_log(&pool, &run)
        .await
        .context("reading the effect log")?;
    let observed = ledger::Observed {
        orders,
        fates,
        confirmed: published.confirmed.clone(),
        first_sent: published.first_sent.clone(),
        effects: effects_seen,
        log,
        rows,
        dlq: dlq_orders,
        leftovers,
        faults: struck.clone(),
        pids,
        instances: instances.clone(),
        start_ms,
        load_end_ms,
        drained,
        dedup_lease_s: DEDUP_LEASE_S,
    };
    let mut verdict = ledger::compute(&observed);
    for problem in &shutdown {
        // A sidecar that does not stop on SIGTERM, or exits with an
        // error, is a hang or a crash: the gate fails.
        verdict.failures.push(format!("shutdown: {problem}"));
    }
    println!("{}", verdict.line);
    for line in &verdict.resume_lines {
        println!("{line}");
    }
    for note in &verdict.notes {
        println!("  {note}");
    }

    // The report and the picture.
    if let serde_json::Value::Object(report) = &mut verdict.json {
        report.insert("run".into(), run.clone().into());
        report.insert("seed".into(), seed.into());
        report.insert("schedule".into(), serde_json::json!(args.schedule));
        report.insert("dedup".into(), crate::torture::enum_name(args.dedup).into());
        report.insert("orders".into(), orders.into());
        report.insert("rate".into(), args.rate.into());
        report.insert("queue".into(), queue.clone().into());
        report.insert("members".into(), serde_json::json!(members));
        report.insert(
            "publisher".into(),
            serde_json::json!({
                "messages_planned": published.planned_messages,
                "publishes": published.publishes,
                "republished": published.republished,
                "connections": published.connections,
                "complete": published.complete,
                "nacks": published.nacks,
                "confirm_errors": published.confirm_errors,
                "confirm_timeouts": published.confirm_timeouts,
                "publish_errors": published.publish_errors,
                "first_failures": published.failures,
                "last_failures": published.last_failures,
            }),
        );
        report.insert("shutdown".into(), serde_json::json!(shutdown));
        report.insert(
            "duration_s".into(),
            ((end_ms - start_ms) as f64 / 1000.0).into(),
        );
    }
    write_report(&args.json, &verdict.json)?;
    let effect_times: Vec<i64> = observed.log.iter().map(|e| e.at_ms).collect();
    let confirm_times: Vec<i64> = published.confirmed.values().copied().collect();
    ensure_parent(&args.plot)?;
    plot::draw(
        &args.plot,
        &format!(
            "backstop chaos --schedule {} --dedup {}: {orders} orders, 3 nodes, 3 sidecars",
            crate::torture::enum_name(args.schedule),
            crate::torture::enum_name(args.dedup)
        ),
        &effect_times,
        &confirm_times,
        &struck,
        start_ms,
        end_ms,
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "chaos: report {}, picture {}",
        args.json.display(),
        args.plot.display()
    );

    cleanup(&must_drain, &dlq, &store, &queue).await;
    let passed = verdict.failures.is_empty();
    if passed {
        let _ = effects::forget_run(&pool, &run).await;
        let _ = std::fs::remove_dir_all(&dir);
        println!("chaos: passed");
        Ok(ExitCode::SUCCESS)
    } else {
        for failure in verdict.failures.iter().take(30) {
            println!("  FAILED: {failure}");
        }
        if verdict.failures.len() > 30 {
            println!("  ... and {} more", verdict.failures.len() - 30);
        }
        println!(
            "chaos: FAILED (seed {seed}); the effects of run {run} stay in database {DATABASE} \
             (tables chaos_effects, chaos_effect_log); the sidecars' configs and logs stay in {}",
            dir.display()
        );
        Ok(ExitCode::from(1))
    }
}

/// Exit 2 unless all three nodes of scripts/cluster.sh run and listen.
async fn check_cluster() -> anyhow::Result<()> {
    for n in cluster::NODES {
        let listening = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(cluster::node_addr(n)),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        let running =
            listening && tokio::task::spawn_blocking(move || cluster::is_running(n)).await?;
        if !running {
            return Err(UsageError(format!(
                "the three-node cluster is not up: {} does not answer on {}; run scripts/cluster.sh up",
                cluster::node_name(n),
                cluster::node_addr(n)
            ))
            .into());
        }
    }
    Ok(())
}

/// Starts any node a failed fault left down.
async fn restore_cluster() {
    for n in cluster::NODES {
        let down = !tokio::task::spawn_blocking(move || cluster::is_running(n))
            .await
            .unwrap_or(false);
        if down {
            println!("chaos: node {n} is down after the schedule; starting it");
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cluster::start(n)).await {
                println!("chaos: starting node {n} failed: {e}");
            }
        }
    }
}

/// The parts of one sidecar's configuration.
struct SidecarSettings<'a> {
    name: &'a str,
    uri: &'a str,
    addresses: &'a [String],
    store: &'a str,
    dedup: &'a str,
    queue: &'a str,
    endpoint: &'a str,
    metrics_port: u16,
}

fn sidecar_config(s: &SidecarSettings<'_>) -> String {
    let list = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(", ");
    let addresses = list(&mut s.addresses.iter().map(|a| format!("{a:?}")));
    let tiers = list(&mut TIERS.iter().map(|t| format!("{t:?}")));
    format!(
        "[broker]\nuri = {uri:?}\naddresses = [{addresses}]\nheartbeat = \"2s\"\n\
         connection_name = \"backstop-chaos-{name}\"\n\n\
         [reconnect]\ninitial = \"50ms\"\nmax = \"1s\"\n\n\
         [store]\nurl = {store:?}\n\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = {queue:?}\nqueue_type = \"quorum\"\n\
         prefetch = {PREFETCH}\nconcurrency = {CONCURRENCY}\nshutdown_timeout = \"5s\"\n\
         handler.http.url = {endpoint:?}\nhandler.http.timeout = \"{HTTP_TIMEOUT}\"\n\
         retry.delays = [{tiers}]\nretry.exhausted = \"store\"\n\
         dedup.key = \"json:/order\"\ndedup.lease = \"{DEDUP_LEASE_S}s\"\ndedup.store = {dedup:?}\n",
        uri = s.uri,
        name = s.name,
        store = s.store,
        port = s.metrics_port,
        queue = s.queue,
        endpoint = s.endpoint,
        dedup = s.dedup,
    )
}

/// Waits until the queues that must drain are empty (no message ready,
/// unacked or waiting to be dead-lettered),
/// no sidecar holds a delivery, the endpoint answers nothing, three polls
/// in a row, and every confirmed order has an effect or a store row (or the
/// DLQ holds something, read later). False at the deadline.
#[allow(clippy::too_many_arguments)]
async fn drain(
    must_drain: &[String],
    dlq: &str,
    sidecars: &[Sidecar],
    endpoint: &EffectsEndpoint,
    pool: &effects::PgPool,
    run: &str,
    store: &SqlStore,
    queue: &str,
    confirmed: &HashMap<String, i64>,
    deadline: Instant,
) -> anyhow::Result<bool> {
    let mut quiet = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let counts = tokio::task::spawn_blocking(|| cluster::queue_counts_from(1)).await?;
        // Messages expired in a tier and waiting for at-least-once
        // dead-lettering back to the queue count in the total only.
        let totals = tokio::task::spawn_blocking(|| cluster::queue_totals_from(1)).await?;
        let (Ok(counts), Ok(totals)) = (counts, totals) else {
            quiet = 0;
            continue;
        };
        let mut idle = endpoint
            .stats()
            .busy
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
            && must_drain.iter().all(|q| {
                counts
                    .get(q)
                    .is_some_and(|c| c.ready == 0 && c.unacked == 0)
                    && totals.get(q) == Some(&0)
            });
        for sidecar in sidecars {
            if !idle {
                break;
            }
            idle = sidecar.in_flight(1).await? == Some(0);
        }
        quiet = if idle { quiet + 1 } else { 0 };
        if quiet < 3 {
            continue;
        }
        if counts.get(dlq).is_some_and(|c| c.ready > 0) {
            return Ok(true);
        }
        let mut accounted: HashSet<String> = effects::effects(pool, run)
            .await
            .map(|all| all.into_iter().map(|e| e.business_id).collect())
            .unwrap_or_default();
        accounted.extend(
            read_rows(store, queue)
                .await?
                .into_iter()
                .filter(|r| !r.finished)
                .map(|r| r.order),
        );
        let missing = confirmed.keys().filter(|o| !accounted.contains(*o)).count();
        if missing == 0 {
            return Ok(true);
        }
        if quiet % 10 == 3 {
            println!("chaos: drained, but {missing} confirmed orders are not accounted for yet");
        }
    }
    Ok(false)
}

/// The store's rows of `queue`, each with its order and audit trail.
async fn read_rows(store: &SqlStore, queue: &str) -> anyhow::Result<Vec<ledger::RowSeen>> {
    let rows = store
        .list(&ListFilter {
            queue: Some(queue.to_owned()),
            limit: Some(1_000_000),
            ..ListFilter::default()
        })
        .await
        .context("listing the store's rows")?;
    let mut seen = Vec::with_capacity(rows.len());
    for row in rows {
        let audit = store
            .audit(row.id)
            .await
            .with_context(|| format!("reading row {}'s audit", row.id))?;
        seen.push(ledger::RowSeen {
            id: row.id,
            order: effects::business_id(&row.payload).unwrap_or_default(),
            status: row.status.to_string(),
            finished: row.status.is_finished(),
            redrives: row.redrives,
            occurrences: row.occurrences,
            audit,
        });
    }
    Ok(seen)
}

/// The orders in the DLQ, and those left in the queues that must drain (a
/// copy a scanner re-drove after the drain), read with `basic.get` and never
/// acked.
async fn read_parked(
    dlq: &str,
    must_drain: &[String],
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let connection = connect_any().await?;
    let channel = connection.create_channel().await?;
    let read = |queue: String| {
        let channel = channel.clone();
        async move {
            let mut orders = Vec::new();
            while let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .with_context(|| format!("basic.get from {queue}"))?
            {
                orders.push(effects::business_id(&message.delivery.data).unwrap_or_default());
            }
            anyhow::Ok(orders)
        }
    };
    let dlq_orders = read(dlq.to_owned()).await?;
    let mut leftovers = Vec::new();
    for queue in must_drain {
        leftovers.extend(read(queue.clone()).await?);
    }
    let _ = channel.close(200, "read".into()).await;
    let _ = connection.close(200, "read".into()).await;
    Ok((dlq_orders, leftovers))
}

/// A connection to the first node that takes one.
async fn connect_any() -> anyhow::Result<Connection> {
    let mut errors = Vec::new();
    for n in cluster::NODES {
        match Connection::connect(&cluster::node_url(n), ConnectionProperties::default()).await {
            Ok(connection) => return Ok(connection),
            Err(e) => errors.push(format!("node {n}: {e}")),
        }
    }
    anyhow::bail!("no cluster node takes a connection: {}", errors.join("; "))
}

/// Deletes the run's queues and closes its store rows (discarded, then
/// purged).
async fn cleanup(must_drain: &[String], dlq: &str, store: &SqlStore, queue: &str) {
    if let Ok(connection) = connect_any().await {
        if let Ok(channel) = connection.create_channel().await {
            for name in must_drain.iter().map(String::as_str).chain([dlq]) {
                let _ = channel
                    .queue_delete(name.into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel.close(200, "cleaned up".into()).await;
        }
        let _ = connection.close(200, "cleaned up".into()).await;
    }
    forget_rows(store, queue, "chaos").await;
}

fn ensure_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

fn write_report(path: &Path, report: &serde_json::Value) -> anyhow::Result<()> {
    ensure_parent(path)?;
    let text = serde_json::to_string_pretty(report).context("serializing the report")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
