//! The three-node cluster of `scripts/cluster.sh`: node addresses, node
//! control (start, graceful stop, `kill -9`) and `rabbitmqctl` against one
//! node; what the cluster says about quorum queues (leader, members) and
//! connections, and a quorum queue's leadership moved on demand. Node `n`
//! (1..=3) is `backstop-c<n>@localhost` with AMQP on `127.0.0.1:570<n>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

/// The cluster's nodes, 1 to 3.
pub const NODES: [u8; 3] = [1, 2, 3];

/// Node `n`'s Erlang node name.
pub fn node_name(n: u8) -> String {
    check(n);
    format!("backstop-c{n}@localhost")
}

/// Node `n`'s AMQP listener.
pub fn node_addr(n: u8) -> SocketAddr {
    check(n);
    SocketAddr::from(([127, 0, 0, 1], 5700 + u16::from(n)))
}

/// An AMQP URL for node `n` (guest, vhost `/`).
pub fn node_url(n: u8) -> String {
    format!("amqp://guest:guest@{}/%2f", node_addr(n))
}

/// Which node has this Erlang node name.
pub fn node_of(name: &str) -> Option<u8> {
    NODES.into_iter().find(|&n| node_name(n) == name)
}

fn check(n: u8) {
    assert!(NODES.contains(&n), "the cluster has nodes 1 to 3, not {n}");
}

/// `scripts/cluster.sh` of this checkout.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster.sh")
}

/// Runs `scripts/cluster.sh <args>`; its stderr on failure.
pub fn cluster_sh(args: &[&str]) -> Result<(), String> {
    let output = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/cluster.sh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Starts node `n` and waits until it runs.
pub fn start(n: u8) -> Result<(), String> {
    cluster_sh(&["start", &n.to_string()])
}

/// Stops node `n` gracefully.
pub fn stop(n: u8) -> Result<(), String> {
    cluster_sh(&["stop", &n.to_string()])
}

/// `kill -9` of node `n`'s Erlang VM.
pub fn kill(n: u8) -> Result<(), String> {
    cluster_sh(&["kill", &n.to_string()])
}

/// Whether node `n` answers and runs the broker.
pub fn is_running(n: u8) -> bool {
    ctl(n, &["-q", "await_startup", "--timeout", "1"]).is_ok()
}

/// Brings the whole cluster up (`scripts/cluster.sh up`): starts what is down.
pub fn up() -> Result<(), String> {
    cluster_sh(&["up"])
}

/// `rabbitmqctl -n <node n> <args>`; stdout on success, stderr on failure.
pub fn ctl(n: u8, args: &[&str]) -> Result<String, String> {
    let node = node_name(n);
    let mut all = vec!["-n", node.as_str()];
    all.extend_from_slice(args);
    crate::rabbitmqctl(&all)
}

/// The node that leads quorum queue `queue`, asked of the first running
/// node. `None` when the queue does not exist or no node answers. Panics on
/// an answer it cannot read.
pub fn leader(queue: &str) -> Option<u8> {
    for n in NODES {
        let Ok(out) = ctl(
            n,
            &["-q", "list_queues", "--no-table-headers", "name", "leader"],
        ) else {
            continue;
        };
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let mut fields = line.split('\t');
            let (Some(name), Some(leader)) = (fields.next(), fields.next()) else {
                panic!("cannot read rabbitmqctl list_queues line {line:?}");
            };
            if name == queue {
                let leader = leader.trim();
                return Some(node_of(leader).unwrap_or_else(|| {
                    panic!("{queue}'s leader {leader:?} is not a cluster node")
                }));
            }
        }
        return None;
    }
    None
}

/// The first running node, or `None` when none answers.
pub fn any_running() -> Option<u8> {
    NODES.into_iter().find(|&n| is_running(n))
}

/// Every queue's counts, as the first running node (trying from `prefer`)
/// sees them: one `rabbitmqctl -n <node> list_queues`. A line it cannot
/// parse is an error, never a zero.
pub fn queue_counts_from(
    prefer: u8,
) -> Result<std::collections::HashMap<String, crate::QueueCounts>, String> {
    crate::parse_queue_counts(&ctl_from(prefer, &crate::QUEUE_COUNTS_ARGS)?)
}

/// `rabbitmqctl <args>` on the first node that answers, trying from
/// `prefer` on; every node's error when none does.
fn ctl_from(prefer: u8, args: &[&str]) -> Result<String, String> {
    let mut errors = Vec::new();
    for n in NODES
        .into_iter()
        .cycle()
        .skip_while(|&n| n != prefer)
        .take(3)
    {
        match ctl(n, args) {
            Ok(out) => return Ok(out),
            Err(e) => errors.push(e),
        }
    }
    Err(format!(
        "no cluster node listed its queues: {}",
        errors.join("; ")
    ))
}

/// Quorum queue `queue`'s members and the members online, as nodes, asked
/// of the first running node. `None` when no node answers or the queue does
/// not exist. Panics on an answer it cannot read.
pub fn members(queue: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let nodes = |list: &str| -> Vec<u8> {
        list.trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| node_of(name).unwrap_or_else(|| panic!("{name:?} is not a cluster node")))
            .collect()
    };
    for n in NODES {
        let Ok(out) = ctl(
            n,
            &[
                "-q",
                "list_queues",
                "--no-table-headers",
                "name",
                "members",
                "online",
            ],
        ) else {
            continue;
        };
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split('\t').collect();
            let [name, members, online] = fields.as_slice() else {
                panic!("cannot read rabbitmqctl list_queues line {line:?}");
            };
            if *name == queue {
                return Some((nodes(members), nodes(online)));
            }
        }
        return None;
    }
    None
}

/// The nodes the cluster reports running (`rabbitmqctl cluster_status`,
/// asked of the first node that answers), sorted; empty when none answers.
/// Panics on an answer it cannot read.
pub fn running_nodes() -> Vec<u8> {
    for n in NODES {
        let Ok(out) = ctl(n, &["-q", "cluster_status", "--formatter", "json"]) else {
            continue;
        };
        let list = out
            .split_once("\"running_nodes\":[")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(list, _)| list)
            .unwrap_or_else(|| panic!("no running_nodes in rabbitmqctl cluster_status: {out}"));
        let mut nodes: Vec<u8> = list
            .split(',')
            .map(|name| name.trim().trim_matches('"'))
            .filter(|name| !name.is_empty())
            .filter_map(node_of)
            .collect();
        nodes.sort_unstable();
        return nodes;
    }
    Vec::new()
}

/// Moves the leadership of quorum queue `queue` (vhost `/`) to node `to`
/// with `rabbit_quorum_queue:transfer_leadership/2`, the call maintenance
/// mode uses to drain a node (RabbitMQ 3.10 has no CLI command for one
/// queue), run on node `to` through `rabbitmqctl eval`. Returns the node
/// leading afterwards, as Ra reports it; an error when the broker answers
/// `not_migrated` or something else.
pub fn transfer_leader(queue: &str, to: u8) -> Result<u8, String> {
    // The name goes into an Erlang binary literal: no quoting to get wrong.
    assert!(
        !queue.is_empty()
            && queue
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "a queue name of letters, digits, '.', '_' and '-' only, not {queue:?}"
    );
    let expr = format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         rabbit_quorum_queue:transfer_leadership(Q, '{}').",
        node_name(to)
    );
    let out = ctl(to, &["-q", "eval", &expr])?;
    let answer = out.trim();
    let leader = answer
        .strip_prefix("{migrated,'")
        .and_then(|rest| rest.strip_suffix("'}"))
        .ok_or_else(|| format!("moving {queue}'s leader to node {to}: {answer}"))?;
    node_of(leader).ok_or_else(|| format!("{queue}'s new leader {leader:?} is not a cluster node"))
}

/// The AMQP connections whose client-given name (`connection_name` client
/// property) is `name`, as the broker port each is connected to, asked of
/// node `via` (the listing covers the whole cluster). Panics on an answer
/// it cannot read.
pub fn connection_ports(via: u8, name: &str) -> Result<Vec<u16>, String> {
    let out = ctl(
        via,
        &[
            "-q",
            "list_connections",
            "--no-table-headers",
            "port",
            "client_properties",
        ],
    )?;
    let wanted = format!("{{\"connection_name\",\"{name}\"}}");
    Ok(out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| l.contains(&wanted))
        .map(|l| {
            let port = l.split('\t').next().unwrap_or_default();
            port.trim()
                .parse()
                .unwrap_or_else(|_| panic!("cannot read rabbitmqctl list_connections line {l:?}"))
        })
        .collect())
}

/// Every queue's total of messages (`rabbitmqctl list_queues name
/// messages`), as the first running node (trying from `prefer`) sees them.
/// For a quorum queue the total also holds messages waiting for
/// at-least-once dead-lettering, which are neither ready nor unacked.
pub fn queue_totals_from(prefer: u8) -> Result<std::collections::HashMap<String, u64>, String> {
    let out = ctl_from(
        prefer,
        &[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages",
        ],
    )?;
    let mut totals = std::collections::HashMap::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let (Some(name), Some(Ok(total))) = (
            line.split('\t').next(),
            line.split('\t').nth(1).map(|t| t.trim().parse::<u64>()),
        ) else {
            return Err(format!("cannot read rabbitmqctl list_queues line {line:?}"));
        };
        totals.insert(name.to_owned(), total);
    }
    Ok(totals)
}
