//! `backstop bench group-retry`: an operator retries a failure group of
//! `--rows` rows (one cause) on a fresh SQLite store, and the real scanner
//! re-drives every row to a durable queue with confirms until each row is
//! `replayed`. The time from the click to the last row replayed is what an
//! operator waits for.

use crate::{UsageError, ui};
use backstop::store::{
    GroupKey, GroupProgress, ManualAction, NewFailedMessage, Redrive, Scanner, ScannerConfig,
    SqlStore, Status, normalize_error, run_group_action,
};
use lapin::options::QueueDeleteOptions;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `backstop bench group-retry`.
#[derive(Debug, clap::Args)]
pub(crate) struct GroupRetryArgs {
    /// Rows in the group.
    #[arg(long, default_value_t = 100_000)]
    rows: i64,
    /// Rows per transaction of the group action.
    #[arg(long, default_value_t = 1000)]
    action_batch: i64,
    /// Rows the scanner claims per scan.
    #[arg(long, default_value_t = 5000)]
    scan_batch: i64,
    /// Re-drive publishes in flight at once.
    #[arg(long, default_value_t = 128)]
    publish_channels: usize,
    #[command(flatten)]
    broker: ui::BrokerArgs,
}

/// Seeds the group, retries it, re-drives it; prints one `bench:` line.
pub(crate) async fn group_retry(args: GroupRetryArgs) -> anyhow::Result<ExitCode> {
    if args.rows <= 0 || args.action_batch <= 0 || args.scan_batch <= 0 {
        return Err(UsageError(
            "--rows, --action-batch and --scan-batch must be at least 1".into(),
        )
        .into());
    }
    let supervisor = args.broker.direct_supervisor("backstop-bench")?;
    let live = supervisor.connection().await?;
    let queue = format!("backstop.bench.group.{}", std::process::id());
    let channel = live.create_channel().await?;
    backstop_testkit::declare_durable(&channel, &queue).await?;
    let path = std::env::temp_dir().join(format!("backstop-bench-group-{}.db", std::process::id()));
    let store = Arc::new(SqlStore::connect(&format!("sqlite://{}", path.display())).await?);

    // Seeding: one group, numbers in the error text differ. Not due for
    // an hour, so only the retry makes them due.
    let later = backstop::retry::now_ms() as i64 + 3_600_000;
    let bar = ui::progress(args.rows as u64, "seeding");
    let mut seeded = 0i64;
    while seeded < args.rows {
        let n = (args.rows - seeded).min(5000);
        let batch: Vec<NewFailedMessage> = (seeded..seeded + n)
            .map(|i| NewFailedMessage {
                queue: queue.clone(),
                exchange: String::new(),
                routing_key: queue.clone(),
                message_id: Some(format!("order-{i}")),
                dedup_key: None,
                payload: format!("{{\"order\":{i},\"amount\":1250}}").into_bytes(),
                headers: "{}".into(),
                properties: format!(
                    r#"{{"message_id":"order-{i}","content_type":"application/json"}}"#
                ),
                error: format!("order {i} declined: provider answered 503"),
                error_kind: "transient".into(),
                attempts: 5,
                next_attempt_at: later,
                store_id: None,
                fingerprint: format!("id:order-{i}"),
            })
            .collect();
        store.store_batch(&batch).await?;
        seeded += n;
        bar.set_position(seeded as u64);
    }
    bar.finish_and_clear();
    let key = GroupKey {
        queue: queue.clone(),
        error_kind: "transient".into(),
        cause: normalize_error("order 1 declined: provider answered 503"),
    };

    // The operator's retry of the whole group.
    let started = Instant::now();
    let progress = GroupProgress::new();
    let totals = run_group_action(
        &store,
        key,
        ManualAction::Retry,
        "bench".into(),
        Some("provider is back".into()),
        args.action_batch,
        progress.clone(),
    )
    .await?;
    let mark = started.elapsed();
    if totals.acted != args.rows as u64 {
        anyhow::bail!("the retry marked {} of {} rows", totals.acted, args.rows);
    }

    // The scanner re-drives them all.
    let scanner = Scanner::new(
        store.clone(),
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            batch: args.scan_batch,
            publish_channels: args.publish_channels,
            queue: Some(queue.clone()),
            ..ScannerConfig::default()
        },
    );
    let bar = ui::progress(args.rows as u64, "re-driven");
    let redrive_started = Instant::now();
    let mut redriven = 0u64;
    loop {
        let report = scanner.run_once().await?;
        redriven += report.redriven;
        bar.set_position(redriven);
        if report.claimed == 0 {
            break;
        }
        if report.unknown > 0 || report.failed > 0 {
            anyhow::bail!("a scan did not re-drive every row: {report:?}");
        }
    }
    let redrive = redrive_started.elapsed();
    let total = started.elapsed();
    bar.finish_and_clear();

    let replayed = backstop::store::CompensationStore::count_by_status(&*store)
        .await?
        .into_iter()
        .find(|(status, _)| *status == Status::Replayed)
        .map_or(0, |(_, n)| n);
    let in_queue = backstop_testkit::ready_count(&channel, &queue).await?;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), supervisor.close()).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    if replayed != args.rows || u64::from(in_queue) != args.rows as u64 {
        anyhow::bail!(
            "{replayed} rows replayed and {in_queue} messages in the queue, of {}",
            args.rows
        );
    }
    println!(
        "bench: group_retry rows={} mark_s={:.2} redrive_s={:.2} total_s={:.2} rows_per_s={:.0}",
        args.rows,
        mark.as_secs_f64(),
        redrive.as_secs_f64(),
        total.as_secs_f64(),
        args.rows as f64 / total.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
