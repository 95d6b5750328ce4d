#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback, beside the single broker of
# scripts/broker.sh (which keeps 5672 and 5671 for itself).
#
#   scripts/cluster.sh up          start the nodes that are down, join them, wait until all three run
#   scripts/cluster.sh down        stop all three nodes
#   scripts/cluster.sh status      one line per node: name, AMQP port, running or down
#   scripts/cluster.sh start N     start node N (1..3) and wait until it runs
#   scripts/cluster.sh stop N      stop node N gracefully (rabbitmqctl stop)
#   scripts/cluster.sh kill N      kill -9 node N's Erlang VM
#   scripts/cluster.sh reset       down, then wipe every node's data (a fresh cluster on the next up)
#
# Node N is backstop-cN@localhost with AMQP on 127.0.0.1:570N and its
# Erlang distribution on 127.0.0.1:2570N; its data is under
# /var/lib/backstop-cluster/cN and its logs under /var/log/backstop-cluster/cN.
# Each node has its own config and plugin files (no TLS listener, no
# management plugin), so nothing collides with the single broker.
# It runs as Debian's rabbitmq-server does: as the rabbitmq user, with the
# rabbitmq user's Erlang cookie, installed through scripts/broker.sh's path.
set -euo pipefail
export ERL_EPMD_ADDRESS=127.0.0.1

base=${BACKSTOP_CLUSTER_DIR:-/var/lib/backstop-cluster}
logs=${BACKSTOP_CLUSTER_LOGS:-/var/log/backstop-cluster}
nodes=(1 2 3)

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

node_name() { echo "backstop-c$1@localhost"; }
amqp_port() { echo "570$1"; }
dist_port() { echo "2570$1"; }

as_rabbitmq() {
  if [ "$(id -u)" -eq 0 ]; then
    su -s /bin/sh rabbitmq -c "$1"
  else
    sh -c "$1"
  fi
}

ctl() {
  local n=$1
  shift
  rabbitmqctl -q -n "$(node_name "$n")" "$@"
}

install() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "rabbitmq-server is not installed and this user is not root"
    log "installing rabbitmq-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  # The Debian package starts its own node through systemd, which does not
  # run here; a container's policy-rc.d refuses it. The cluster never
  # touches that node.
}

# Writes node N's config, plugin and environment files (idempotent).
prepare() {
  local n=$1 dir="$base/c$1" logdir="$logs/c$1"
  mkdir -p "$dir/mnesia" "$logdir"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")
listeners.ssl = none
loopback_users.guest = true
cluster_partition_handling = pause_minority
log.file.level = info
EOF
  echo '[].' >"$dir/enabled_plugins"
  : >"$dir/rabbitmq-env.conf"
  cat >"$dir/env" <<EOF
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_NODENAME=$(node_name "$n")
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$(amqp_port "$n")
export RABBITMQ_DIST_PORT=$(dist_port "$n")
export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
export RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
export RABBITMQ_MNESIA_BASE=$dir/mnesia
export RABBITMQ_LOG_BASE=$logdir
export RABBITMQ_PID_FILE=$dir/pid
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  if [ "$(id -u)" -eq 0 ]; then
    chown -R rabbitmq:rabbitmq "$base" "$logs"
  fi
}

running() { ctl "$1" await_startup --timeout 1 >/dev/null 2>&1; }

# Closes every file descriptor above 2 of the current (sub)shell. A node
# started with the caller's descriptors open keeps them for as long as it
# runs: a `flock /tmp/broker.lock` around a test that starts a node would
# then stay held by the node's Erlang VM, and every later flock waits for ever.
close_inherited_fds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] 2>/dev/null; then
      eval "exec $fd>&-" 2>/dev/null || true
    fi
  done
}

start_node() {
  local n=$1
  prepare "$n"
  if ctl "$n" ping >/dev/null 2>&1; then
    ctl "$n" start_app >/dev/null 2>&1 || true
  else
    log "starting $(node_name "$n") on 127.0.0.1:$(amqp_port "$n")"
    (
      close_inherited_fds
      # The open-file limit as in scripts/broker.sh (su resets it).
      as_rabbitmq "ulimit -n 65536 2>/dev/null || ulimit -n \"\$(ulimit -Hn)\"; . '$base/c$n/env' && rabbitmq-server -detached" >/dev/null 2>&1
    ) || die "rabbitmq-server -detached failed for node $n; see $logs/c$n/"
  fi
}

wait_node() {
  local n=$1
  for _ in $(seq 1 90); do
    if ctl "$n" ping >/dev/null 2>&1 && ctl "$n" await_startup --timeout 60 >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  die "$(node_name "$n") did not start within 90 s; see $logs/c$n/"
}

stop_node() {
  local n=$1
  if ctl "$n" ping >/dev/null 2>&1; then
    log "stopping $(node_name "$n")"
    # With the pid file, rabbitmqctl waits until the VM has exited: a start
    # right after must not find the halting node still answering.
    ctl "$n" stop "$base/c$n/pid" >/dev/null 2>&1 || true
  fi
}

kill_node() {
  local n=$1 pid
  pid=$(cat "$base/c$n/pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || die "node $n is not running (no live pid in $base/c$n/pid)"
  # A stale pid file must not name another process (the main broker, say).
  tr '\0' '\n' <"/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=$(node_name "$n")" ||
    die "pid $pid in $base/c$n/pid is not node $n's VM"
  log "kill -9 $(node_name "$n") (pid $pid)"
  kill -9 "$pid"
}

# Joins nodes 2 and 3 to node 1 when they are not in its cluster yet.
join() {
  local n members
  # A failed query must not read as "not a member": that would reset a
  # member and wipe its replicas.
  members=$(ctl 1 cluster_status --formatter json 2>/dev/null) || die "cannot read node 1's cluster status"
  for n in 2 3; do
    if ! grep -q "\"$(node_name "$n")\"" <<<"$(grep -o '"disk_nodes":\[[^]]*\]' <<<"$members")"; then
      log "joining $(node_name "$n") to $(node_name 1)"
      {
        ctl "$n" stop_app &&
          ctl "$n" reset &&
          ctl "$n" join_cluster "$(node_name 1)" &&
          ctl "$n" start_app
      } >"$logs/c$n/join.log" 2>&1 || die "joining node $n failed: $(cat "$logs/c$n/join.log")"
    fi
  done
}

node_arg() {
  case "${1:-}" in
    1 | 2 | 3) echo "$1" ;;
    *) log "usage: $0 start|stop|kill N, with N one of 1, 2, 3"; exit 2 ;;
  esac
}

case "${1:-}" in
  up)
    install
    for n in "${nodes[@]}"; do start_node "$n"; done
    for n in "${nodes[@]}"; do wait_node "$n"; done
    join
    for n in "${nodes[@]}"; do wait_node "$n"; done
    running=$(ctl 1 cluster_status --formatter json | grep -o '"running_nodes":\[[^]]*\]')
    for n in "${nodes[@]}"; do
      grep -q "$(node_name "$n")" <<<"$running" || die "$(node_name "$n") is not running in the cluster: $running"
    done
    log "three nodes are up: 127.0.0.1:5701, 127.0.0.1:5702, 127.0.0.1:5703"
    ;;
  down)
    for n in "${nodes[@]}"; do stop_node "$n"; done
    ;;
  reset)
    for n in "${nodes[@]}"; do stop_node "$n"; done
    rm -rf "$base" "$logs"
    ;;
  status)
    for n in "${nodes[@]}"; do
      if running "$n"; then state=running; else state=down; fi
      printf '%s 127.0.0.1:%s %s\n' "$(node_name "$n")" "$(amqp_port "$n")" "$state"
    done
    ;;
  start) n=$(node_arg "${2:-}"); start_node "$n"; wait_node "$n" ;;
  stop) n=$(node_arg "${2:-}"); stop_node "$n" ;;
  kill) n=$(node_arg "${2:-}"); kill_node "$n" ;;
  *)
    log "usage: $0 up|down|status|reset|start N|stop N|kill N"
    exit 2
    ;;
esac
