//! `backstop torture`: the randomized ledger test. Each round draws a
//! scenario from its seed (see [`plan`]), runs the real sidecar
//! (`backstop run` as a child process) against the real broker through the
//! test kit's fault proxy, with a real compensation store and dedup store,
//! delivering to an in-process endpoint that answers from a seeded mix and
//! writes down every request (see [`endpoint`]). Faults strike on the
//! seed's schedule. Once the broker has drained, every published message
//! and business id is checked against the ledger invariant (see
//! [`verdict`]).
//!
//! Exit 0 when every invariant held in every round; 1 with the seed and the
//! first broken business id's full history otherwise.

mod endpoint;
mod plan;
mod verdict;

use crate::UsageError;
use crate::servers::{RedisRestart, forget_rows, rabbitmqctl_blocking, restart_servers};
use crate::sidecar::{Sidecar, free_port, write_private};
use anyhow::Context;
use backstop::store::{CompensationStore, ListFilter, SqlStore};
use backstop_testkit::{FaultProxy, unique, url_via};
use endpoint::Endpoint;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use plan::{DLQ_CONSUMER, Fault, FaultSet, KeyShape, MESSAGE_TTL, Plan, STORE_CONSUMER, Without};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use verdict::{Observed, Parked, StoredRow, Summary};

/// The sidecar's HTTP timeout; a slow answer comes 500 ms after it.
const HTTP_TIMEOUT: Duration = Duration::from_secs(1);
/// The retry tiers of both consumers.
const TIERS: [&str; 2] = ["200ms", "1s"];
/// Handler slots per consumer: the bound on extra effects per `kill -9`.
const CONCURRENCY: u32 = 4;
const PREFETCH: u16 = 20;
/// The dedup claim lease: short, so that the claims a killed sidecar held
/// free up within the round.
const DEDUP_LEASE: &str = "10s";

/// Where `backstop torture` keeps its compensation store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    /// A SQLite file in the round's temporary folder.
    Sqlite,
    /// The PostgreSQL named by `BACKSTOP_POSTGRES_URL` (or the test default).
    Postgres,
}

/// Where `backstop torture` keeps dedup keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DedupKind {
    /// The Redis named by `BACKSTOP_REDIS_URL` (or 127.0.0.1:6379).
    Redis,
    /// The PostgreSQL named by `BACKSTOP_POSTGRES_URL`.
    Postgres,
    /// A SQLite file in the round's temporary folder.
    Sqlite,
    /// No deduplication: every message is its own business id.
    Off,
}

/// Options of `backstop torture`.
#[derive(Debug, clap::Args)]
pub(crate) struct TortureArgs {
    /// The first round's seed (default: random; always printed). Round i
    /// uses seed + i, so `--seed S --iterations 1` replays round S.
    #[arg(long)]
    seed: Option<u64>,
    /// How many rounds (default 1; unlimited with --duration).
    #[arg(long)]
    iterations: Option<u64>,
    /// Start no new round after this long (`30m`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Messages per round, about 10% of them deliberate duplicates.
    #[arg(long, default_value_t = 40)]
    messages: u64,
    /// The compensation store. With postgres, run against a database of its
    /// own: the sidecar's scanner re-drives every due row it finds there.
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreKind,
    /// The dedup store.
    #[arg(long, value_enum, default_value = "sqlite")]
    dedup: DedupKind,
    /// Which faults rounds draw. `all` adds broker restarts and restarts of
    /// the store's or dedup store's server: never on a shared machine.
    #[arg(long, value_enum, default_value = "default")]
    faults: FaultSet,
    /// Leave an answer kind or a key shape out of the mix (repeatable), to
    /// look past a known defect for the next one.
    #[arg(long, value_enum)]
    without: Vec<Without>,
    /// Give up waiting for a round to drain this long after it started;
    /// what is left is reported as broken. Keep it under a minute: the
    /// sidecar's scanner re-drives stored rows 60 s after they were
    /// written, and the check does not expect that.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "50s")]
    round_timeout: Duration,
    /// Go on after a broken round (each one is reported), and exit 1 at the
    /// end if any broke.
    #[arg(long)]
    keep_going: bool,
}

/// `backstop torture`.
pub(crate) async fn run(args: TortureArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.messages > 5_000 {
        return Err(UsageError(format!(
            "--messages {} is out of range: use 1 to 5000 per round",
            args.messages
        ))
        .into());
    }
    if args.iterations == Some(0) {
        return Err(UsageError("--iterations 0 runs nothing: use 1 or more".into()).into());
    }
    let uri = backstop_testkit::amqp_url();
    let broker = crate::ui::loopback_addr(&uri)?;
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..u64::MAX / 2));
    let rounds = match (args.iterations, args.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => 1,
    };
    println!(
        "torture: seed={seed} messages={} store={:?} dedup={:?} faults={:?} without={:?}",
        args.messages, args.store, args.dedup, args.faults, args.without
    );
    if args.store == StoreKind::Postgres {
        eprintln!(
            "torture: warning: with --store postgres the sidecar's scanner re-drives due rows of \
             every queue in that database (issue 12 item 7); use a database of its own"
        );
    }
    // reqwest is built without a crypto provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let started = Instant::now();
    let mut total = Summary::default();
    let mut done = 0;
    let mut broken_rounds: Vec<u64> = Vec::new();
    let mut broken_total = 0;
    for i in 0..rounds {
        if let Some(limit) = args.duration
            && i > 0
            && started.elapsed() >= limit
        {
            break;
        }
        let round_seed = seed.wrapping_add(i);
        let round_started = Instant::now();
        let result = round(&args, &uri, broker, round_seed).await?;
        done += 1;
        total.add(&result.summary);
        println!(
            "round {i} seed={round_seed}: {} faults=[{}] {} ({:.1}s)",
            result.summary.line(),
            result.faults.join(", "),
            if result.broken.is_empty() {
                "ok"
            } else {
                "BROKEN"
            },
            round_started.elapsed().as_secs_f64()
        );
        for line in &result.counted {
            println!("  counted: {line}");
        }
        if result.broken.is_empty() {
            continue;
        }
        for line in result.broken.iter().take(20) {
            println!("  broken: {line}");
        }
        if result.broken.len() > 20 {
            println!("  ... and {} more", result.broken.len() - 20);
        }
        println!("{}", result.report);
        println!(
            "torture: replay this round with: backstop torture --seed {round_seed} --messages {} --store {} --dedup {} --faults {}{}",
            args.messages,
            enum_name(args.store),
            enum_name(args.dedup),
            enum_name(args.faults),
            args.without
                .iter()
                .map(|w| format!(" --without {}", enum_name(*w)))
                .collect::<String>()
        );
        broken_total += result.broken.len();
        broken_rounds.push(round_seed);
        if !args.keep_going {
            break;
        }
    }
    let seeds = if broken_rounds.is_empty() {
        String::new()
    } else {
        format!(
            " broken_seeds={}",
            broken_rounds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    println!(
        "torture: seed={seed} rounds={done} {} broken={broken_total}{seeds} elapsed={:.1}s",
        total.line(),
        started.elapsed().as_secs_f64()
    );
    Ok(if broken_rounds.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A clap value's name as typed on the command line.
pub(crate) fn enum_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// What one round found.
struct RoundResult {
    summary: Summary,
    faults: Vec<String>,
    /// Allowed duplicates, one line each.
    counted: Vec<String>,
    /// One line per broken business id.
    broken: Vec<String>,
    /// The first broken business id's history, and where the logs are.
    report: String,
}

/// The queues of one round.
#[derive(Clone, Debug)]
struct Queues {
    /// `[store consumer, dlq consumer]`.
    main: [String; 2],
    /// Where messages that expire in a main queue are dead-lettered by the
    /// round's policy: the publisher's TTL at work, not a loss.
    expired: String,
    policy: String,
}

impl Queues {
    fn new(base: &str) -> Self {
        Queues {
            main: [format!("{base}.store"), format!("{base}.dl")],
            expired: format!("{base}.expired"),
            policy: format!("{base}.policy"),
        }
    }

    fn tiers(&self) -> Vec<String> {
        self.main
            .iter()
            .flat_map(|q| TIERS.iter().map(move |t| format!("{q}.retry.{t}")))
            .collect()
    }

    fn dlq(&self) -> String {
        format!("{}.dlq", self.main[DLQ_CONSUMER])
    }

    /// Every queue that must be empty at the end.
    fn must_drain(&self) -> Vec<String> {
        self.main.iter().cloned().chain(self.tiers()).collect()
    }

    fn all(&self) -> Vec<String> {
        let mut all = self.must_drain();
        all.push(self.dlq());
        all.push(self.expired.clone());
        all
    }
}

async fn round(
    args: &TortureArgs,
    uri: &str,
    broker: std::net::SocketAddr,
    seed: u64,
) -> anyhow::Result<RoundResult> {
    let base = unique(&format!("torture.{seed}"));
    let queues = Queues::new(&base);
    let plan = plan::draw(
        seed,
        args.messages,
        args.faults,
        &args.without,
        &format!("s{seed}"),
    );
    let dir = std::env::temp_dir().join(&base);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let store_url = match args.store {
        StoreKind::Sqlite => format!("sqlite://{}", dir.join("store.db").display()),
        StoreKind::Postgres => backstop_testkit::postgres_url(),
    };
    let dedup_url = match args.dedup {
        DedupKind::Redis => Some(backstop_testkit::redis_url()),
        DedupKind::Postgres => Some(backstop_testkit::postgres_url()),
        DedupKind::Sqlite => Some(format!("sqlite://{}", dir.join("dedup.db").display())),
        DedupKind::Off => None,
    };

    let start = Instant::now();
    let fates = plan.orders.iter().map(|o| (o.id.clone(), o.fate)).collect();
    let endpoint = Endpoint::start(seed, fates, args.without.clone(), HTTP_TIMEOUT, start)
        .await
        .context("starting the endpoint")?;
    let proxy = FaultProxy::start(broker)
        .await
        .context("starting the fault proxy")?;
    let port = free_port()?;
    let config = sidecar_config(
        &url_via(uri, proxy.addr()),
        &queues,
        &endpoint.url,
        &store_url,
        dedup_url.as_deref(),
        port,
    );
    let config_path = dir.join("backstop.toml");
    write_private(&config_path, &config)?;

    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "connecting to the broker at {}",
                backstop::RedactedUri::new(uri)
            )
        })?;
    let channel = connection.create_channel().await?;
    declare(&channel, &queues.expired).await?;
    set_expiry_policy(&queues).await?;

    let mut sidecar = Sidecar::new(config_path, dir.join("sidecar.log"), port);
    let outcome = drive(
        args,
        &plan,
        &queues,
        &endpoint,
        &proxy,
        &mut sidecar,
        &connection,
        start,
        &store_url,
        dedup_url.as_deref(),
    )
    .await;
    // Clean up whatever happened, then report.
    let shutdown = sidecar.stop().await;
    let inspected = match &outcome {
        Ok(_) => Some(inspect(&connection, &queues, &store_url).await),
        Err(_) => None,
    };
    cleanup(&connection, &queues, &store_url, args.store).await;
    let _ = connection.close(200, "torture round done".into()).await;
    let (faults, drained) = outcome?;
    let (dlq, expired, leftovers, rows) = inspected.unwrap_or_else(|| Ok(Default::default()))?;

    let observed = Observed {
        requests: endpoint.ledger.requests(),
        landings: endpoint.ledger.landings(),
        dlq,
        expired,
        leftovers,
        rows,
        faults: faults.clone(),
        dedup_on: args.dedup != DedupKind::Off,
        slots: CONCURRENCY * 2,
        drained,
        shutdown,
    };
    let checked = verdict::check(&plan, &observed);
    let mut report = String::new();
    if let Some(first) = checked.first_broken {
        report = verdict::history(&plan, &observed, first, &queues.main);
    }
    if checked.broken.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        report.push_str(&format!(
            "\nthe round's files (config, store, sidecar log) are kept in {}\n",
            dir.display()
        ));
    }
    Ok(RoundResult {
        summary: checked.summary,
        faults: faults
            .iter()
            .map(|(at, f)| format!("{f}@{:.1}s", at.as_secs_f64()))
            .collect(),
        broken: checked.broken,
        counted: checked.counted,
        report,
    })
}

/// Publishes the plan, strikes the faults and waits for the queues to
/// drain. Returns the faults as they struck and whether the round drained.
#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &TortureArgs,
    plan: &Plan,
    queues: &Queues,
    endpoint: &Endpoint,
    proxy: &FaultProxy,
    sidecar: &mut Sidecar,
    connection: &Connection,
    start: Instant,
    store_url: &str,
    dedup_url: Option<&str>,
) -> anyhow::Result<(Vec<(Duration, String)>, bool)> {
    sidecar.start().await?;
    let publisher = tokio::spawn(publish(
        connection.create_channel().await?,
        plan.clone(),
        queues.main.clone(),
        start,
    ));
    let mut struck = Vec::new();
    for (at, fault) in &plan.faults {
        tokio::time::sleep_until((start + *at).into()).await;
        let when = start.elapsed();
        let name = strike(*fault, proxy, sidecar, store_url, dedup_url).await?;
        struck.push((when, name));
    }
    publisher
        .await
        .context("the publishing task failed")?
        .context("publishing the round's messages")?;
    // A message with a TTL must have had time to expire, wherever a copy of
    // it sits: a copy that kept `expiration` would be gone by then.
    let ttl_horizon = plan
        .messages
        .iter()
        .filter(|m| m.ttl)
        .map(|m| m.at + MESSAGE_TTL + Duration::from_secs(1))
        .max()
        .unwrap_or_default();
    tokio::time::sleep_until((start + ttl_horizon).into()).await;
    let drained = drain(
        connection,
        queues,
        endpoint,
        sidecar,
        start + args.round_timeout,
    )
    .await?;
    Ok((struck, drained))
}

async fn strike(
    fault: Fault,
    proxy: &FaultProxy,
    sidecar: &mut Sidecar,
    store_url: &str,
    dedup_url: Option<&str>,
) -> anyhow::Result<String> {
    Ok(match fault {
        Fault::Cut => {
            proxy.cut();
            "cut".to_owned()
        }
        Fault::Blackhole(d) => {
            proxy.blackhole();
            tokio::time::sleep(d).await;
            proxy.restore();
            format!("blackhole {}ms", d.as_millis())
        }
        Fault::Kill(pause) => {
            sidecar.kill9();
            tokio::time::sleep(pause).await;
            sidecar.start().await?;
            format!("kill -9 (restarted after {}ms)", pause.as_millis())
        }
        Fault::BrokerRestart(pause) => {
            rabbitmqctl_blocking(vec!["stop_app".into()]).await?;
            tokio::time::sleep(pause).await;
            rabbitmqctl_blocking(vec!["start_app".into()]).await?;
            format!("broker restart ({}ms down)", pause.as_millis())
        }
        Fault::StoreRestart => {
            let urls: Vec<&str> = std::iter::once(store_url).chain(dedup_url).collect();
            restart_servers(&urls, RedisRestart::DropData).await?
        }
    })
}

/// Dead-letters messages that expire in the round's main queues to the
/// round's `expired` queue, so a message the broker dropped for its TTL is
/// seen rather than counted as lost. A policy, because the sidecar declares
/// the queues without arguments.
async fn set_expiry_policy(queues: &Queues) -> anyhow::Result<()> {
    let pattern = format!(
        "^({})$",
        queues
            .main
            .iter()
            .map(|q| q.replace('.', "\\."))
            .collect::<Vec<_>>()
            .join("|")
    );
    let definition = serde_json::json!({
        "dead-letter-exchange": "",
        "dead-letter-routing-key": queues.expired,
    })
    .to_string();
    rabbitmqctl_blocking(vec![
        "set_policy".into(),
        "--apply-to".into(),
        "queues".into(),
        queues.policy.clone(),
        pattern,
        definition,
    ])
    .await
    .context("setting the round's expiry policy")?;
    Ok(())
}

fn sidecar_config(
    broker_uri: &str,
    queues: &Queues,
    url: &str,
    store_url: &str,
    dedup_url: Option<&str>,
    metrics_port: u16,
) -> String {
    let tiers = TIERS
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "[broker]\nuri = {broker_uri:?}\nheartbeat = \"2s\"\nconnection_name = \"backstop-torture\"\n\n\
         [reconnect]\ninitial = \"50ms\"\nmax = \"500ms\"\n\n\
         [store]\nurl = {store_url:?}\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    );
    for (n, queue) in queues.main.iter().enumerate() {
        let exhausted = if n == STORE_CONSUMER {
            "store"
        } else {
            "dead-letter"
        };
        text.push_str(&format!(
            "\n[[consumer]]\nqueue = {queue:?}\nprefetch = {PREFETCH}\nconcurrency = {CONCURRENCY}\n\
             shutdown_timeout = \"5s\"\n\
             handler.http.url = {url:?}\nhandler.http.timeout = \"{}ms\"\n\
             retry.delays = [{tiers}]\nretry.exhausted = \"{exhausted}\"\n",
            HTTP_TIMEOUT.as_millis()
        ));
        if let Some(dedup) = dedup_url {
            text.push_str(&format!(
                "dedup.key = \"header:x-order-id\"\ndedup.lease = \"{DEDUP_LEASE}\"\ndedup.store = {dedup:?}\n"
            ));
        }
    }
    text
}

async fn declare(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring {queue}"))?;
    Ok(())
}

/// Publishes every message of the plan at its time, each confirmed.
async fn publish(
    channel: Channel,
    plan: Plan,
    queues: [String; 2],
    start: Instant,
) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for message in &plan.messages {
        tokio::time::sleep_until((start + message.at).into()).await;
        let order = &plan.orders[message.order];
        let mut headers = FieldTable::default();
        match &order.key {
            KeyShape::Absent => {}
            KeyShape::Text(text) => {
                headers.insert(
                    "x-order-id".into(),
                    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec())),
                );
            }
            KeyShape::Binary(bytes) => {
                headers.insert(
                    "x-order-id".into(),
                    AMQPValue::LongString(LongString::from(bytes.clone())),
                );
            }
            KeyShape::ByteArray(bytes) => {
                headers.insert(
                    "x-order-id".into(),
                    AMQPValue::ByteArray(ByteArray::from(bytes.clone())),
                );
            }
        }
        if message.long_note {
            headers.insert(
                "x-note".into(),
                AMQPValue::LongString(LongString::from(vec![b'n'; plan::LONG_HEADER])),
            );
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(message.message_id.as_str().into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        if message.ttl {
            properties = properties.with_expiration(MESSAGE_TTL.as_millis().to_string().into());
        }
        let body = serde_json::json!({ "order": order.id, "note": "torture" }).to_string();
        let confirm = channel
            .basic_publish(
                "".into(),
                queues[order.consumer].as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await?
            .await?;
        anyhow::ensure!(
            confirm.is_ack(),
            "the broker nacked message {}",
            message.message_id
        );
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(())
}

/// Waits until nothing moves any more: every queue that must drain is
/// empty, the sidecar holds nothing, the endpoint answers nothing, and the
/// ledger stopped growing, three polls in a row; then the broker's own
/// counts (unacked included) confirm it. False at the deadline.
async fn drain(
    connection: &Connection,
    queues: &Queues,
    endpoint: &Endpoint,
    sidecar: &Sidecar,
    deadline: Instant,
) -> anyhow::Result<bool> {
    let mut channel = connection.create_channel().await?;
    let mut quiet = 0;
    let mut last_received = usize::MAX;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let received = endpoint.ledger.received();
        let mut idle = endpoint.ledger.busy() == 0
            && received == last_received
            && sidecar.in_flight(2).await? == Some(0);
        last_received = received;
        for queue in queues.must_drain() {
            if !idle {
                break;
            }
            match backstop_testkit::ready_count(&channel, &queue).await {
                Ok(ready) => idle = ready == 0,
                Err(_) => {
                    // A missing tier (not declared yet) closes the channel.
                    idle = false;
                    channel = connection.create_channel().await?;
                }
            }
        }
        quiet = if idle { quiet + 1 } else { 0 };
        if quiet >= 3 {
            let counts = tokio::task::spawn_blocking(backstop_testkit::all_queue_counts)
                .await?
                .map_err(anyhow::Error::msg)?;
            if queues.must_drain().iter().all(|n| {
                counts
                    .get(n)
                    .is_some_and(|c| c.ready == 0 && c.unacked == 0)
            }) {
                return Ok(true);
            }
            quiet = 0;
        }
    }
    Ok(false)
}

type Inspected = (
    Vec<Parked>,
    Vec<Parked>,
    Vec<(String, Parked)>,
    Vec<StoredRow>,
);

/// Reads the DLQ, the expired queue and whatever is left in the queues
/// that must drain (with basic.get, never acked), and the store's rows.
async fn inspect(
    connection: &Connection,
    queues: &Queues,
    store_url: &str,
) -> anyhow::Result<Inspected> {
    let channel = connection.create_channel().await?;
    let dlq = read_queue(&channel, &queues.dlq()).await?;
    let expired = read_queue(&channel, &queues.expired).await?;
    let mut leftovers = Vec::new();
    for queue in queues.must_drain() {
        for parked in read_queue(&channel, &queue).await? {
            leftovers.push((queue.clone(), parked));
        }
    }
    // Closing the channel requeues what was read; the queues go next anyway.
    let _ = channel.close(200, "inspected".into()).await;

    let store = SqlStore::connect(store_url)
        .await
        .context("opening the compensation store")?;
    let rows = store
        .list(&ListFilter {
            queue: Some(queues.main[STORE_CONSUMER].clone()),
            limit: Some(1_000_000),
            ..ListFilter::default()
        })
        .await
        .context("listing the store's rows")?;
    let rows = rows
        .into_iter()
        .map(|row| StoredRow {
            id: row.id,
            message_id: row.message_id.clone().unwrap_or_default(),
            order: order_of(&row.payload),
            status: row.status.to_string(),
            finished: row.status.is_finished(),
            error: row.error.clone(),
            attempts: row.attempts,
        })
        .collect();
    Ok((dlq, expired, leftovers, rows))
}

fn order_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("order")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn read_queue(channel: &Channel, queue: &str) -> anyhow::Result<Vec<Parked>> {
    let mut found = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .with_context(|| format!("basic.get from {queue}"))?
    {
        let delivery = message.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |name: &str| {
            headers
                .inner()
                .get(name)
                .and_then(backstop::retry::header_str)
                .unwrap_or_default()
        };
        found.push(Parked {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
            order: order_of(&delivery.data),
            note: format!(
                "attempts={} error={:?} expiration={:?}",
                text(backstop::retry::ATTEMPTS_HEADER),
                text(backstop::retry::ERROR_HEADER),
                delivery
                    .properties
                    .expiration()
                    .as_ref()
                    .map(|e| e.to_string()),
            ),
        });
    }
    Ok(found)
}

/// Deletes the round's queues and policy; with PostgreSQL, its rows too
/// (discarded, then purged).
async fn cleanup(connection: &Connection, queues: &Queues, store_url: &str, store: StoreKind) {
    if let Ok(channel) = connection.create_channel().await {
        for queue in queues.all() {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel.close(200, "cleaned up".into()).await;
    }
    let _ = rabbitmqctl_blocking(vec!["clear_policy".into(), queues.policy.clone()]).await;
    if store == StoreKind::Postgres
        && let Ok(db) = SqlStore::connect(store_url).await
    {
        forget_rows(&db, &queues.main[STORE_CONSUMER], "torture").await;
    }
}
