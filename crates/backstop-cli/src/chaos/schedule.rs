//! The fault schedules of `backstop chaos` and how each fault is carried
//! out against the three-node cluster, the fault proxies in front of it, the
//! sidecars and the servers they share.
//!
//! A schedule is a list of faults at fixed offsets from the start of the
//! load; a fault never starts before the previous one ended plus
//! [`MIN_GAP`], so a slow node start delays what follows instead of piling
//! faults up. Each fault is recorded with its start, the end of its
//! recovery step (a node started again, a proxy restored, a sidecar ready
//! again) and its end (the cluster whole again).

use crate::servers::{RedisRestart, restart_postgres, restart_redis};
use crate::sidecar::Sidecar;
use backstop::retry::now_ms;
use backstop_testkit::{FaultProxy, cluster};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The least time between the end of a fault and the start of the next.
pub(crate) const MIN_GAP: Duration = Duration::from_secs(10);
/// How long a node restarted may take to be a quorum member online again.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);

/// Which schedule runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ScheduleName {
    /// CI's: the queue leader's node stopped and started, one sidecar
    /// `kill -9` then restarted; 5,000 orders, under 4 minutes.
    Short,
    /// The whole matrix, one fault after the other with recovery gaps.
    Full,
}

/// Which node a fault strikes, decided when it strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The node leading the run's quorum queue.
    Leader,
    /// This node.
    Node(u8),
    /// The node carrying the most sidecar connections (through its proxy).
    Busiest,
}

/// One fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// `rabbitmqctl stop`, `down` later a start, then wait until it is a
    /// quorum member online again.
    StopStart { target: Target, down: Duration },
    /// `kill -9` of the node's VM, `down` later a start, then the rejoin.
    KillNode { target: Target, down: Duration },
    /// The node's proxy stops forwarding (the pulled cable) for `hold`.
    Blackhole { target: Target, hold: Duration },
    /// `rabbitmqctl close_all_connections` on every node.
    CloseConnections,
    /// `kill -9` of sidecar `instance` (0-based), started again `down` later.
    KillSidecar { instance: usize, down: Duration },
    /// `pg_ctlcluster <v> main restart`.
    RestartPostgres,
    /// Redis shut down (its keys saved) and started again.
    RestartRedis,
    /// Each node stopped and started in turn, each rejoining before the next.
    RollingRestart,
}

impl Fault {
    /// The fault's kind, as the ledger groups time-to-resume.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Fault::StopStart { .. } => "node-stop-start",
            Fault::KillNode { .. } => "node-kill-9",
            Fault::Blackhole { .. } => "node-blackhole",
            Fault::CloseConnections => "connection-close",
            Fault::KillSidecar { .. } => "sidecar-kill-9",
            Fault::RestartPostgres => "postgres-restart",
            Fault::RestartRedis => "redis-restart",
            Fault::RollingRestart => "rolling-restart",
        }
    }
}

/// A fault at its offset from the start of the load.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub(crate) at: Duration,
    pub(crate) fault: Fault,
}

fn step(seconds: u64, fault: Fault) -> Step {
    Step {
        at: Duration::from_secs(seconds),
        fault,
    }
}

/// The schedule's faults.
pub(crate) fn steps(name: ScheduleName) -> Vec<Step> {
    let down = Duration::from_secs(10);
    match name {
        ScheduleName::Short => vec![
            step(
                15,
                Fault::StopStart {
                    target: Target::Leader,
                    down,
                },
            ),
            step(
                60,
                Fault::KillSidecar {
                    instance: 1,
                    down: Duration::from_secs(3),
                },
            ),
        ],
        ScheduleName::Full => vec![
            step(
                20,
                Fault::StopStart {
                    target: Target::Node(1),
                    down,
                },
            ),
            step(
                75,
                Fault::StopStart {
                    target: Target::Node(2),
                    down,
                },
            ),
            step(
                130,
                Fault::StopStart {
                    target: Target::Node(3),
                    down,
                },
            ),
            step(
                185,
                Fault::KillNode {
                    target: Target::Leader,
                    down,
                },
            ),
            step(
                240,
                Fault::Blackhole {
                    target: Target::Busiest,
                    hold: Duration::from_secs(20),
                },
            ),
            step(285, Fault::CloseConnections),
            step(
                310,
                Fault::KillSidecar {
                    instance: 0,
                    down: Duration::from_secs(3),
                },
            ),
            step(340, Fault::RestartPostgres),
            step(370, Fault::RestartRedis),
            step(400, Fault::RollingRestart),
        ],
    }
}

/// How long the load lasts by default: the last fault's offset plus room
/// for it (a rolling restart takes about a minute) and a quiet tail.
pub(crate) fn load_length(name: ScheduleName) -> Duration {
    match name {
        ScheduleName::Short => Duration::from_secs(100),
        ScheduleName::Full => Duration::from_secs(540),
    }
}

/// A fault as it was carried out. Times are ms since the epoch.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Struck {
    /// [`Fault::kind`].
    pub(crate) kind: &'static str,
    /// What was done, in words (which node, leader or not, how long).
    pub(crate) label: String,
    pub(crate) start_ms: i64,
    /// When the recovery step was done (node started, proxy restored,
    /// sidecar ready, server answering); `None` for a fault without one.
    pub(crate) recovered_ms: Option<i64>,
    pub(crate) end_ms: i64,
    /// The sidecar instance killed (0-based), for a sidecar `kill -9`.
    pub(crate) killed_instance: Option<usize>,
    /// Why the fault could not be carried out through.
    pub(crate) error: Option<String>,
}

/// What the faults act on.
pub(crate) struct Rig<'a> {
    /// One proxy per node, in node order.
    pub(crate) proxies: &'a [FaultProxy],
    pub(crate) sidecars: &'a mut [Sidecar],
    pub(crate) queue: &'a str,
    /// The Redis the run's dedup may use (restarted by `RestartRedis`).
    pub(crate) redis_port: u16,
}

/// Carries `fault` out and records it.
pub(crate) async fn strike(fault: Fault, rig: &mut Rig<'_>) -> Struck {
    let start_ms = now_ms() as i64;
    let mut struck = Struck {
        kind: fault.kind(),
        label: String::new(),
        start_ms,
        recovered_ms: None,
        end_ms: start_ms,
        killed_instance: None,
        error: None,
    };
    if let Err(e) = carry_out(fault, rig, &mut struck).await {
        struck.error = Some(format!("{e:#}"));
    }
    struck.end_ms = now_ms() as i64;
    struck
}

async fn carry_out(fault: Fault, rig: &mut Rig<'_>, struck: &mut Struck) -> anyhow::Result<()> {
    match fault {
        Fault::StopStart { target, down } | Fault::KillNode { target, down } => {
            let (n, name) = resolve(target, rig.queue).await;
            if matches!(fault, Fault::StopStart { .. }) {
                struck.label = format!("stop and start node {n}{name}");
                blocking(move || cluster::stop(n)).await?;
            } else {
                struck.label = format!("kill -9 node {n}{name}, then start it");
                blocking(move || cluster::kill(n)).await?;
            }
            tokio::time::sleep(down).await;
            blocking(move || cluster::start(n)).await?;
            struck.recovered_ms = Some(now_ms() as i64);
            rejoin(rig.queue, n).await?;
        }
        Fault::Blackhole { target, hold } => {
            let (n, name) = resolve(target, rig.queue).await;
            struck.label = format!("blackhole node {n}{name} at its proxy for {hold:?}");
            let proxy = &rig.proxies[usize::from(n) - 1];
            proxy.blackhole();
            tokio::time::sleep(hold).await;
            proxy.restore();
            struck.recovered_ms = Some(now_ms() as i64);
        }
        Fault::CloseConnections => {
            struck.label = "close every connection on all three nodes".to_owned();
            for n in cluster::NODES {
                blocking(move || {
                    cluster::ctl(n, &["-q", "close_all_connections", "backstop chaos"]).map(|_| ())
                })
                .await?;
            }
        }
        Fault::KillSidecar { instance, down } => {
            struck.label = format!(
                "kill -9 sidecar i{} (pid {}), restart it {down:?} later",
                instance + 1,
                rig.sidecars[instance]
                    .pid()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "none".to_owned())
            );
            struck.killed_instance = Some(instance);
            rig.sidecars[instance].kill9();
            tokio::time::sleep(down).await;
            rig.sidecars[instance].start().await?;
            struck.recovered_ms = Some(now_ms() as i64);
        }
        Fault::RestartPostgres => {
            struck.label = "restart PostgreSQL (store, dedup and effects)".to_owned();
            restart_postgres().await?;
            struck.recovered_ms = Some(now_ms() as i64);
        }
        Fault::RestartRedis => {
            struck.label = "restart Redis (keys kept: SHUTDOWN SAVE)".to_owned();
            restart_redis(rig.redis_port, RedisRestart::KeepData).await?;
            struck.recovered_ms = Some(now_ms() as i64);
        }
        Fault::RollingRestart => {
            struck.label = "rolling restart of nodes 1, 2, 3".to_owned();
            for n in cluster::NODES {
                blocking(move || cluster::stop(n)).await?;
                blocking(move || cluster::start(n)).await?;
                rejoin(rig.queue, n).await?;
            }
            struck.recovered_ms = Some(now_ms() as i64);
        }
    }
    Ok(())
}

/// The node `target` names now, and ` (leader)` when it leads the queue.
async fn resolve(target: Target, queue: &str) -> (u8, &'static str) {
    let queue = queue.to_owned();
    let leader = tokio::task::spawn_blocking(move || cluster::leader(&queue))
        .await
        .ok()
        .flatten();
    let n = match target {
        Target::Node(n) => n,
        Target::Leader => leader.unwrap_or(1),
        Target::Busiest => tokio::task::spawn_blocking(busiest_node)
            .await
            .ok()
            .flatten()
            .unwrap_or(1),
    };
    (n, if leader == Some(n) { " (leader)" } else { "" })
}

/// The node with the most sidecar connections (named `backstop-chaos-i*`),
/// from `rabbitmqctl list_connections name pid` (a connection's pid names
/// its node).
fn busiest_node() -> Option<u8> {
    let n = cluster::any_running()?;
    let out = cluster::ctl(
        n,
        &[
            "-q",
            "list_connections",
            "--no-table-headers",
            "name",
            "pid",
        ],
    )
    .ok()?;
    let mut per_node = [0u32; 3];
    for line in out.lines() {
        let mut fields = line.split('\t');
        let (Some(name), Some(pid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !name.starts_with("backstop-chaos-i") {
            continue;
        }
        for n in cluster::NODES {
            if pid.contains(&format!("{}.", cluster::node_name(n))) {
                per_node[usize::from(n) - 1] += 1;
            }
        }
    }
    let (index, count) = per_node
        .iter()
        .enumerate()
        .max_by_key(|(_, count)| **count)?;
    (*count > 0).then_some(index as u8 + 1)
}

/// Waits until node `n` is a member online of `queue` again.
async fn rejoin(queue: &str, n: u8) -> anyhow::Result<()> {
    let deadline = Instant::now() + REJOIN_TIMEOUT;
    loop {
        let name = queue.to_owned();
        let members = tokio::task::spawn_blocking(move || cluster::members(&name)).await?;
        if members.is_some_and(|(_, online)| online.contains(&n)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {n} was not a member online of {queue} {REJOIN_TIMEOUT:?} after its start"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs a blocking cluster call off the runtime.
async fn blocking(
    call: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(call)
        .await?
        .map_err(anyhow::Error::msg)
}
