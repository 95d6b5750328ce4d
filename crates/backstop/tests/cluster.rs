//! Cluster behaviour the runtime must handle (issue 14, item 5), on the
//! three-node cluster of `scripts/cluster.sh` (AMQP on 127.0.0.1:5701-5703),
//! never on the single broker:
//! - a quorum queue's leader moves under a consumer (moved by the broker's
//!   own leadership transfer, or because the leader's node stops);
//! - the node a consumer is connected to goes away (`kill -9`, or a
//!   graceful stop), and it goes on through another of its addresses;
//! - a publisher confirm is lost after its copy landed, so the copy is
//!   published again and the duplicate is absorbed by dedup.
//!
//! Every queue is a quorum queue with a member on each of the three nodes.
//! The tests stop and kill nodes, so they run one at a time (a lock); each
//! brings back a node that is down when it starts, and again when it ends,
//! passed or failed. They are a module of the library's `suite` (nothing else
//! there uses the cluster; `backstop chaos`, which does, runs in another phase
//! of scripts/test).

use crate::common;

use backstop::connection::{ConnectionConfig, ConnectionSupervisor};
use backstop::consumer::{ConsumerConfig, ConsumerHandle, ConsumerReport};
use backstop::dedup::{DedupConfig, DedupKey, SqlSeenStore};
use backstop::handler::Outcome;
use backstop::retry::RetryPolicy;
use backstop::topology::{Queue, QueueType, Topology};
use backstop_testkit::cluster::{self, NODES};
use backstop_testkit::{FaultProxy, ready_count, unique, url_via, wait_until};
use common::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a blocking cluster command off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Starts every node that is down. Panics when the cluster cannot be
/// brought up: the test would prove nothing on fewer nodes.
fn ensure_up() {
    if cluster::running_nodes() != NODES {
        cluster::up().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Brings the cluster back to three running nodes when dropped, so that a
/// test failing with a node down does not fail the next one too.
struct ClusterGuard;

impl ClusterGuard {
    async fn start() -> Self {
        blocking(ensure_up).await;
        ClusterGuard
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if cluster::running_nodes() != NODES
            && let Err(e) = cluster::up()
        {
            eprintln!("could not bring the cluster back up: {e}");
        }
    }
}

/// A plain connection to node `n`, for arranging and inspecting.
async fn connect_to(n: u8) -> Connection {
    Connection::connect(&cluster::node_url(n), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to cluster node {n}: {e}"))
}

/// Declares `topology` through node `n`: a quorum queue declared there is
/// led from there (RabbitMQ's default leader locator, client-local).
async fn declare_on(n: u8, topology: &Topology) {
    let connection = connect_to(n).await;
    let channel = connection.create_channel().await.expect("channel");
    topology.apply(&channel).await.expect("declare");
    let _ = connection.close(200, "declared".into()).await;
}

/// Asserts that `queue` has a member on every node and is led by `leader`.
async fn assert_replicated(queue: &str, leader: u8) {
    let name = queue.to_owned();
    let (members, led_by) =
        blocking(move || (cluster::members(&name), cluster::leader(&name))).await;
    let (mut members, mut online) = members.unwrap_or_else(|| panic!("no quorum queue {queue}"));
    members.sort_unstable();
    online.sort_unstable();
    assert_eq!(
        (members.as_slice(), online.as_slice()),
        (NODES.as_slice(), NODES.as_slice()),
        "{queue} must be a quorum queue with a member on each node, all online"
    );
    assert_eq!(led_by, Some(leader), "{queue}'s leader");
}

/// Messages ready in `queue`, by a passive declare through node `n`.
async fn ready_on(n: u8, queue: &str) -> u32 {
    let connection = connect_to(n).await;
    let channel = connection.create_channel().await.expect("channel");
    let ready = ready_count(&channel, queue)
        .await
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"));
    let _ = connection.close(200, "counted".into()).await;
    ready
}

/// Deletes `queues` through node `n`.
async fn delete_on(n: u8, queues: &[String]) {
    let connection = connect_to(n).await;
    for queue in queues {
        backstop_testkit::delete_queue(&connection, queue).await;
    }
    let _ = connection.close(200, "deleted".into()).await;
}

/// A dedup store of its own: SQLite in a fresh file, keyed on the message id.
async fn sqlite_dedup() -> DedupConfig {
    let path = std::env::temp_dir().join(format!("{}.db", unique("backstop-cluster-seen")));
    let store = SqlSeenStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("sqlite seen store");
    DedupConfig::new(DedupKey::MessageId, Arc::new(store))
}

/// A supervisor over `urls` in that order, named `name` on the broker.
fn cluster_supervisor(urls: &[String], name: &str) -> ConnectionSupervisor {
    let (first, rest) = urls.split_first().expect("at least one address");
    let config = rest
        .iter()
        .fold(ConnectionConfig::new(first), |config, url| {
            config.address(url)
        });
    ConnectionSupervisor::start(
        config
            .heartbeat(Duration::from_secs(5))
            .connection_name(name)
            .backoff(fast_backoff())
            .connect_timeout(Duration::from_secs(2)),
    )
    .expect("valid supervisor config")
}

/// Publishes `prefix-0`, `prefix-1`, ... to a queue through one node, one
/// at a time, each confirmed before the next: a steady stream until stopped.
struct Stream {
    prefix: String,
    confirmed: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Stream {
    fn start(node: u8, queue: &str, prefix: &str, every: Duration) -> Self {
        let confirmed = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (queue, id_prefix, count) = (queue.to_owned(), prefix.to_owned(), confirmed.clone());
        let task = tokio::spawn(async move {
            let connection = connect_to(node).await;
            let channel = connection.create_channel().await.expect("channel");
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            let mut i = 0u64;
            while !*stopped.borrow_and_update() {
                let confirmation = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"x",
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id(format!("{id_prefix}-{i}").into()),
                    )
                    .await
                    .unwrap_or_else(|e| {
                        panic!("publishing {id_prefix}-{i} through node {node}: {e}")
                    });
                let confirmation = confirmation
                    .await
                    .unwrap_or_else(|e| panic!("confirm of {id_prefix}-{i}: {e}"));
                assert!(
                    confirmation.is_ack(),
                    "node {node} did not confirm {id_prefix}-{i}: {confirmation:?}"
                );
                i += 1;
                count.store(i, Ordering::Release);
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => {}
                }
            }
            let _ = connection.close(200, "stream done".into()).await;
            i
        });
        Stream {
            prefix: prefix.to_owned(),
            confirmed,
            stop,
            task,
        }
    }

    /// Messages confirmed so far: the next one published is `prefix-<this>`.
    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    fn id(&self, i: u64) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Stops publishing; how many messages were confirmed.
    async fn stop(self) -> u64 {
        self.stop.send_replace(true);
        self.task.await.expect("the stream's publisher failed")
    }
}

/// True once the handler succeeded for `id`.
fn handled(recorder: &Recorder, id: &str) -> bool {
    recorder
        .handled
        .lock()
        .map(|h| h.contains_key(id))
        .unwrap_or(false)
}

async fn wait_for_id(recorder: &Recorder, id: &str, what: &str, timeout: Duration) -> Duration {
    wait_until(what, timeout, || {
        let done = handled(recorder, id);
        async move { done }
    })
    .await
}

/// How many times the runtime logged the broker's `basic.cancel`.
fn cancels(logs: &CapturedLogs) -> usize {
    logs.text()
        .matches("the broker cancelled the consumer")
        .count()
}

/// Messages published in one go right before each fault, so that it hits
/// a consumer holding a full prefetch window with more waiting behind.
const BACKLOG: u64 = 500;

/// The consumer's prefetch in the stream tests.
const PREFETCH: u16 = 20;

/// A quorum queue consumed through a supervisor with dedup, fed by a steady
/// [`Stream`] through node 3 (never faulted), and faulted by the test.
struct Scene {
    queue: String,
    name: String,
    supervisor: ConnectionSupervisor,
    consumer: ConsumerHandle,
    recorder: Recorder,
    stream: Stream,
    /// For the backlogs, through node 3.
    publisher: Connection,
    backlogs: Vec<String>,
    /// When each handler call ended, in order.
    calls: Arc<std::sync::Mutex<Vec<Instant>>>,
}

/// What a fault met, and how consuming came back.
struct Recovery {
    /// Deliveries the consumer held unacked when the fault began.
    held: u64,
    /// How long the fault command took.
    fault: Duration,
    /// The longest time without a handler call ending, from the start of
    /// the fault until the first message published after it was handled:
    /// the pause in consuming.
    pause: Duration,
    /// From the end of the fault command until the first message published
    /// after it was handled (the backlog is handled first).
    first_new_handled: Duration,
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "under {} unacked deliveries; the fault took {:?}; consuming paused at most {:?}; the \
             first message published after it was handled {:?} after it",
            self.held, self.fault, self.pause, self.first_new_handled
        )
    }
}

impl Scene {
    /// Declares the queue through node `leader` (it leads it), and starts a
    /// consumer over the nodes `urls` (in that order) and the stream.
    async fn start(prefix: &str, leader: u8, nodes: [u8; 3]) -> Self {
        let queue = unique(&format!("cluster-{prefix}"));
        declare_on(leader, &Topology::new().queue(Queue::quorum(&queue))).await;
        assert_replicated(&queue, leader).await;
        let name = unique(&format!("backstop-{prefix}"));
        let urls: Vec<String> = nodes.map(cluster::node_url).to_vec();
        let supervisor = cluster_supervisor(&urls, &name);
        let recorder = Recorder::default();
        let calls: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let ended = calls.clone();
        let consumer = spawn(
            &supervisor,
            ConsumerConfig::new(&queue)
                .topology(Topology::new().queue(Queue::quorum(&queue)))
                .prefetch(PREFETCH)
                .concurrency(4)
                .dedup(sqlite_dedup().await)
                .shutdown_timeout(Duration::from_secs(5)),
            &recorder,
            move |_, _| {
                let ended = ended.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ended.lock().expect("calls lock").push(Instant::now());
                    Outcome::Ack
                }
            },
        );
        wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
        let stream = Stream::start(3, &queue, "s", Duration::from_millis(10));
        wait_for_id(
            &recorder,
            "s-30",
            "a steady stream",
            Duration::from_secs(30),
        )
        .await;
        Scene {
            queue,
            name,
            supervisor,
            consumer,
            recorder,
            stream,
            publisher: connect_to(3).await,
            backlogs: Vec::new(),
            calls,
        }
    }

    /// Publishes a backlog, waits until the consumer holds a full window,
    /// runs `fault` (blocking), then waits until consuming goes on: a new
    /// delivery, the first stream message published after the fault
    /// handled, and 30 more.
    async fn fault<T: Send + 'static>(
        &mut self,
        what: &str,
        fault: impl FnOnce() -> T + Send + 'static,
    ) -> (T, Recovery) {
        let prefix = format!("b{}", self.backlogs.len());
        backstop_testkit::publish(&self.publisher, &self.queue, BACKLOG, &prefix, |_| {
            b"x".to_vec()
        })
        .await;
        self.backlogs.push(prefix);
        wait_stats(&self.consumer, "a full window before the fault", |s| {
            s.unacked >= u64::from(PREFETCH) / 2
        })
        .await;
        let held = self.consumer.stats().unacked;
        let started = Instant::now();
        let result = blocking(fault).await;
        let done = Instant::now();
        let first = self.stream.confirmed();
        wait_for_id(
            &self.recorder,
            &self.stream.id(first),
            &format!("the first message published after {what} to be handled"),
            Duration::from_secs(60),
        )
        .await;
        let first_new_handled = done.elapsed();
        let pause = {
            let calls = self.calls.lock().expect("calls lock");
            let window: Vec<Instant> = std::iter::once(started)
                .chain(calls.iter().copied().filter(|&t| t > started))
                .take_while(|&t| t <= done + first_new_handled)
                .collect();
            window
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .max()
                .unwrap_or_default()
        };
        wait_for_id(
            &self.recorder,
            &self.stream.id(first + 30),
            &format!("30 more messages after {what}"),
            Duration::from_secs(60),
        )
        .await;
        let recovery = Recovery {
            held,
            fault: done - started,
            pause,
            first_new_handled,
        };
        (result, recovery)
    }

    /// Stops the stream, waits until every message published was handled,
    /// shuts the consumer down and checks the outcome: each effect exactly
    /// once, for nothing else, and the queue empty (read through node
    /// `via`). Deletes the queue.
    async fn finish(self, via: u8) -> (u64, ConsumerReport) {
        let Scene {
            queue,
            supervisor,
            consumer,
            recorder,
            stream,
            publisher,
            backlogs,
            ..
        } = self;
        let published = stream.stop().await;
        let mut expected: Vec<String> = (0..published).map(|i| format!("s-{i}")).collect();
        for prefix in &backlogs {
            expected.extend((0..BACKLOG).map(|i| format!("{prefix}-{i}")));
        }
        recorder
            .wait_handled(
                expected.len(),
                "every confirmed message handled",
                Duration::from_secs(60),
            )
            .await;
        wait_stats(&consumer, "every handled message acked", |s| s.unacked == 0).await;
        let report = consumer.shutdown().await.expect("clean shutdown");
        supervisor.close().await;
        {
            let handled = recorder.handled.lock().expect("handled lock");
            for id in &expected {
                assert_eq!(
                    handled.get(id),
                    Some(&1),
                    "{id}: the handler's effect must happen exactly once"
                );
            }
            assert_eq!(
                handled.len(),
                expected.len(),
                "nothing but the published messages was handled"
            );
        }
        assert_eq!(
            ready_on(via, &queue).await,
            0,
            "{queue} must end empty: every message acked, none back in the queue"
        );
        let _ = publisher.close(200, "done".into()).await;
        delete_on(
            via,
            &[queue.clone(), RetryPolicy::dead_letter_queue(&queue)],
        )
        .await;
        (expected.len() as u64, report)
    }
}

/// Issue 14, item 5: the quorum queue's leader moves, by the broker's own
/// leadership transfer (what maintenance mode does), three times: between
/// two nodes the consumer is not connected to, onto the consumer's node,
/// and away from it. Each move meets a consumer holding a full prefetch
/// window with a backlog behind it. Consuming goes on through every move;
/// nothing is lost and no effect happens twice.
///
/// RabbitMQ 3.10 does not cancel a quorum queue's consumer when the leader
/// moves: the channel's queue client follows the new leader, and the
/// deliveries it holds stay checked out to it. The test prints whether a
/// cancel came; if one does (another broker version), the consumer must
/// have subscribed again, or nothing after the move would be handled.
// One thread, so the captured logs see the consumer's.
#[tokio::test(flavor = "current_thread")]
async fn a_quorum_leader_transferred_under_a_consumer_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let _cluster = ClusterGuard::start().await;
    let (logs, _logs) = CapturedLogs::start("backstop=info");
    // Led from node 1, consumed through node 2.
    let mut scene = Scene::start("transfer", 1, [2, 3, 1]).await;
    for (to, what) in [
        (
            3,
            "a move between two nodes the consumer is not connected to",
        ),
        (2, "a move onto the consumer's node"),
        (1, "a move away from the consumer's node"),
    ] {
        let queue = scene.queue.clone();
        let (moved, recovery) = scene
            .fault(what, move || cluster::transfer_leader(&queue, to))
            .await;
        assert_eq!(moved, Ok(to), "the leader after {what}");
        println!(
            "leader moved to node {to} ({what}) {recovery}; broker cancels so far: {}, sessions \
             so far: {}",
            cancels(&logs),
            scene.consumer.stats().sessions
        );
    }
    let reconnects = finish_leader_moves(scene, &logs, "leader transfers").await;
    assert_eq!(reconnects, 0, "the connection itself never moved");
}

/// Ends a leader-move test with [`Scene::finish`]'s checks, and checks
/// that each cancel by the broker was followed by a subscription of the
/// consumer's own. Returns the supervisor's reconnects.
async fn finish_leader_moves(scene: Scene, logs: &CapturedLogs, what: &str) -> u64 {
    let supervisor = scene.supervisor.clone();
    let (handled, report) = scene.finish(3).await;
    let cancelled = cancels(logs);
    println!(
        "{what}: {handled} messages handled once each, cancels {cancelled}, sessions {}, \
         duplicates absorbed {}, delivered {}, reconnects {}",
        report.sessions,
        report.duplicates,
        report.delivered,
        supervisor.reconnects()
    );
    assert!(
        report.sessions > cancelled as u64,
        "subscribed again after each cancel: {report:?}"
    );
    supervisor.reconnects()
}

/// Issue 14, item 5: the leader's node stops (gracefully) under a consumer
/// connected to another node and holding a full window; the queue elects a
/// new leader among the two nodes left, and consuming goes on.
#[tokio::test(flavor = "current_thread")]
async fn the_leader_s_node_stopping_under_a_consumer_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let _cluster = ClusterGuard::start().await;
    let (logs, _logs) = CapturedLogs::start("backstop=info");
    let mut scene = Scene::start("leader-down", 1, [2, 3, 1]).await;
    let (stopped, recovery) = scene
        .fault("the leader's node stopped", || cluster::stop(1))
        .await;
    stopped.unwrap_or_else(|e| panic!("{e}"));
    let queue = scene.queue.clone();
    let leader = blocking(move || cluster::leader(&queue)).await;
    println!(
        "leader's node 1 stopped {recovery}; new leader {leader:?}; broker cancels: {}, \
         sessions: {}",
        cancels(&logs),
        scene.consumer.stats().sessions
    );
    assert!(
        matches!(leader, Some(2 | 3)),
        "a new leader on a running node: {leader:?}"
    );
    blocking(|| cluster::start(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    finish_leader_moves(scene, &logs, "leader's node stopped").await;
}

/// How the connected node goes away.
#[derive(Clone, Copy, Debug)]
enum NodeLoss {
    /// `kill -9` of its Erlang VM: the sockets close, nothing is said.
    Kill,
    /// `rabbitmqctl stop`: the broker closes its connections first.
    Stop,
}

/// The broker ports `name`'s connections are listed on, asked of node 2.
async fn ports_of(name: &str) -> Vec<u16> {
    let name = name.to_owned();
    blocking(move || cluster::connection_ports(2, &name))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Issue 14, item 5: the node the consumer is connected to goes away. The
/// consumer has all three addresses, node 1 first; the queue is led from
/// node 2, so only the connection moves. The node goes away under a full
/// window with a backlog behind it. The consumer reconnects through another
/// address (the broker lists its connection on 5702 or 5703), goes on
/// consuming, and every message published before and after is handled
/// exactly once; the deliveries it held come back and the ones already
/// handled are absorbed by dedup.
async fn connected_node_goes_away(how: NodeLoss) {
    let _serial = SERIAL.lock().await;
    let _cluster = ClusterGuard::start().await;
    init_tracing();
    let mut scene = Scene::start("node-gone", 2, [1, 2, 3]).await;
    let name = scene.name.clone();
    assert_eq!(
        ports_of(&name).await,
        [5701],
        "connected to node 1, its first address"
    );
    let (lost, recovery) = scene
        .fault("node 1 went away", move || match how {
            NodeLoss::Kill => cluster::kill(1),
            NodeLoss::Stop => cluster::stop(1),
        })
        .await;
    lost.unwrap_or_else(|e| panic!("{e}"));
    let listed = wait_until(
        "the broker to list the consumer's connection on another node",
        Duration::from_secs(30),
        || {
            let name = name.clone();
            async move {
                let ports = ports_of(&name).await;
                ports.len() == 1 && ports[0] != 5701
            }
        },
    )
    .await;
    let (ports, publishing) = (
        ports_of(&name).await,
        ports_of(&format!("{name} (publish)")).await,
    );
    println!(
        "node 1 {how:?} {recovery}; the connection listed on {ports:?} (publishing connection \
         on {publishing:?}) {listed:?} after that; reconnects {}",
        scene.supervisor.reconnects()
    );
    assert!(
        scene.supervisor.reconnects() >= 1,
        "the consumer reconnected"
    );
    blocking(|| cluster::start(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (handled, report) = scene.finish(3).await;
    println!(
        "node 1 {how:?}: {handled} messages handled once each, sessions {}, duplicates absorbed \
         {}, delivered {}",
        report.sessions, report.duplicates, report.delivered
    );
    assert!(report.sessions >= 2, "subscribed again: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connected_node_killed_the_consumer_goes_on_through_another_address() {
    connected_node_goes_away(NodeLoss::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connected_node_stopped_the_consumer_goes_on_through_another_address() {
    connected_node_goes_away(NodeLoss::Stop).await;
}

/// Issue 14, item 5: a publisher confirm is lost after its copy landed. A
/// message fails once; its retry copy goes out on the publishing
/// connection, through a proxy that lets the publish reach the broker and
/// throws the broker's answer away. Once the copy is in its tier queue,
/// that connection is cut: the confirm is lost for good. The runtime
/// publishes the copy again on a new publishing connection and acks the
/// original on that confirm; both copies come back from the tier, and dedup
/// absorbs the second. The consumer's own connection is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_confirm_was_lost_is_published_again_and_dedup_absorbs_it() {
    let _serial = SERIAL.lock().await;
    let _cluster = ClusterGuard::start().await;
    init_tracing();
    let queue = unique("cluster-lost-confirm");
    let tier_delay = Duration::from_secs(2);
    let policy = RetryPolicy::new().delays([tier_delay]);
    let tier = RetryPolicy::tier_queue(&queue, tier_delay);
    let topology = Topology::new().queue(Queue::quorum(&queue));
    declare_on(
        1,
        &topology
            .clone()
            .merge(policy.topology(&queue, QueueType::Quorum)),
    )
    .await;
    assert_replicated(&queue, 1).await;
    assert_replicated(&tier, 1).await;
    // Both of the consumer's connections go through the proxy: the
    // consumers' first (connection 1), the publishing one when the session
    // opens (connection 2).
    let proxy = FaultProxy::start(cluster::node_addr(1))
        .await
        .expect("proxy");
    let supervisor = cluster_supervisor(
        &[url_via(&cluster::node_url(1), proxy.addr())],
        &unique("backstop-lost-confirm"),
    );
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .retry(policy.clone())
            .dedup(sqlite_dedup().await)
            // One confirm channel: the copy goes on the channel the first
            // copy opened, with no round trip of its own first.
            .publish_channels(1)
            .publish_timeout(Duration::from_secs(10)),
        &recorder,
        |_, call| async move {
            if call == 1 {
                Outcome::retry("the downstream failed once")
            } else {
                Outcome::Ack
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let mut publishing = supervisor.publishing().state();
    tokio::time::timeout(Duration::from_secs(30), publishing.wait_for(|s| s.is_up()))
        .await
        .expect("the publishing connection")
        .expect("state");
    assert_eq!(
        proxy.accepted(),
        2,
        "the consumers' and the publishing connection"
    );
    let publisher = connect_to(2).await;

    // A first message opens the publishing channel and goes round once.
    backstop_testkit::publish(&publisher, &queue, 1, "warm", |_| b"x".to_vec()).await;
    wait_stats(&consumer, "the first copy confirmed", |s| s.retried == 1).await;
    recorder
        .wait_handled(
            1,
            "the first message back from its tier",
            Duration::from_secs(30),
        )
        .await;

    // From now on the broker's answers on the publishing connection are lost.
    proxy.drop_replies(2);
    backstop_testkit::publish(&publisher, &queue, 1, "lost", |_| b"x".to_vec()).await;
    wait_until(
        "the copy to land in its tier",
        Duration::from_secs(30),
        || async { ready_on(2, &tier).await == 1 },
    )
    .await;
    let stats = consumer.stats();
    assert_eq!(stats.retried, 1, "the copy landed, unconfirmed: {stats:?}");
    assert!(
        proxy.replies_dropped() > 0,
        "the broker's answer was thrown away"
    );
    proxy.cut_connection(2);

    wait_stats(&consumer, "the copy published again and confirmed", |s| {
        s.retried == 2
    })
    .await;
    wait_stats(&consumer, "the second copy absorbed as a duplicate", |s| {
        s.duplicates >= 1
    })
    .await;
    recorder
        .wait_handled(2, "the message handled", Duration::from_secs(30))
        .await;
    wait_stats(&consumer, "everything acked", |s| s.unacked == 0).await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    println!(
        "lost confirm: retried {}, publish failures {}, duplicates {}, delivered {}, sessions {}, \
         proxy connections {}, broker bytes thrown away {}",
        report.retried,
        report.publish_failures,
        report.duplicates,
        report.delivered,
        report.sessions,
        proxy.accepted(),
        proxy.replies_dropped()
    );
    assert_eq!(
        recorder.calls_of("lost-0"),
        2,
        "failed once, then handled once"
    );
    assert_eq!(
        recorder.handled.lock().expect("handled").get("lost-0"),
        Some(&1),
        "the handler's effect happened exactly once"
    );
    assert_eq!(report.duplicates, 1, "the second copy, counted: {report:?}");
    assert!(
        report.publish_failures >= 1,
        "the lost confirm failed a publish: {report:?}"
    );
    // Two originals, the first one's copy, and both copies of the second.
    assert_eq!(report.delivered, 5, "{report:?}");
    assert_eq!(
        report.sessions, 1,
        "the consumer's session never ended: {report:?}"
    );
    assert_eq!(
        supervisor.reconnects(),
        0,
        "the consumers' connection never dropped"
    );
    supervisor.close().await;
    for name in [&queue, &tier, &RetryPolicy::dead_letter_queue(&queue)] {
        assert_eq!(ready_on(2, name).await, 0, "{name} must end empty");
    }
    let _ = publisher.close(200, "done".into()).await;
    delete_on(
        2,
        &[queue.clone(), tier, RetryPolicy::dead_letter_queue(&queue)],
    )
    .await;
}
