#!/usr/bin/env bash
# Brings up a local RabbitMQ on 127.0.0.1:5672 unless BACKSTOP_AMQP_URL names
# an existing broker. Sourced by scripts/demo and scripts/test; safe to run twice.
set -euo pipefail
export ERL_EPMD_ADDRESS=127.0.0.1

log() { printf 'broker: %s\n' "$*" >&2; }

if [ -n "${BACKSTOP_AMQP_URL:-}" ]; then
  log "using the broker named by BACKSTOP_AMQP_URL"
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    log "rabbitmq-server is not installed and this user is not root;"
    log "install it (apt-get install rabbitmq-server) or set BACKSTOP_AMQP_URL"
    exit 2
  fi
  log "installing rabbitmq-server with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq rabbitmq-server >/dev/null
fi

# Every rabbitmqctl call below has a deadline: one that cannot reach its node
# (epmd, a name that does not resolve) must not hold the suite for minutes.
ctl() { timeout 40 rabbitmqctl -q "$@"; }

# Loopback only: the broker, epmd and the Erlang distribution port never
# listen on another address. The node is rabbit@localhost, so that neither it
# nor rabbitmqctl depends on how this machine's own hostname resolves (a CI
# failure: the node never answered within the loop below).
conf=/etc/rabbitmq/rabbitmq-env.conf
env_lines=(
  'NODENAME=rabbit@localhost'
  'NODE_IP_ADDRESS=127.0.0.1'
  'NODE_PORT=5672'
  'export ERL_EPMD_ADDRESS=127.0.0.1'
  'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"'
)
if [ -w "$(dirname "$conf")" ]; then
  missing=()
  for line in "${env_lines[@]}"; do
    grep -qxF "$line" "$conf" 2>/dev/null || missing+=("$line")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    # A node running under the former settings (another node name) is
    # stopped first; rabbitmqctl would no longer find it afterwards.
    if ctl status >/dev/null 2>&1; then
      log "stopping the running node to apply ${missing[*]}"
      ctl stop >/dev/null 2>&1 || true
      for _ in $(seq 1 30); do
        ctl status >/dev/null 2>&1 || break
        sleep 1
      done
      if ctl status >/dev/null 2>&1; then
        log "the running node did not stop within 30 s; stop it (rabbitmqctl stop) and run this again"
        exit 1
      fi
    fi
    printf '%s\n' "${missing[@]}" >>"$conf"
  fi
fi

# The TLS listener (127.0.0.1:5671), EXTERNAL auth and the test certificates.
# A running broker is restarted when tls.sh changed its configuration.
tls_dir=${BACKSTOP_TLS_DIR:-/etc/rabbitmq/backstop-tls}
if [ "$(id -u)" -eq 0 ]; then
  bash "$(dirname "$0")/tls.sh"
  if [ -e "$tls_dir/restart-needed" ] && ctl status >/dev/null 2>&1; then
    log "restarting rabbitmq to apply the TLS configuration"
    ctl stop >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do
      ctl status >/dev/null 2>&1 || break
      sleep 1
    done
  fi
fi

if ctl status >/dev/null 2>&1; then
  log "rabbitmq is running"
else
  log "starting rabbitmq-server"
  # The open-file limit is raised first, as Debian's systemd unit does
  # (LimitNOFILE=65536): with the default 1024, a node recovering more queues
  # than it has file handles never finishes booting. It is set inside the
  # su command, because su's PAM session (pam_limits) resets it.
  start='ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; ERL_EPMD_ADDRESS=127.0.0.1 exec rabbitmq-server -detached'
  if [ "$(id -u)" -eq 0 ]; then
    # The init script is refused by policy-rc.d in containers; start the node
    # directly as the rabbitmq user, detached.
    su -s /bin/sh rabbitmq -c "$start" >/dev/null 2>&1 || sh -c "$start"
  else
    sh -c "$start"
  fi
fi

# What the node and this machine said, printed when the broker does not come
# up, so that a failed CI run names the cause.
diagnose() {
  log "rabbitmq did not start within $1 s; what the node and the machine say:"
  for f in /var/log/rabbitmq/startup_err /var/log/rabbitmq/startup_log /var/log/rabbitmq/rabbit@localhost.log; do
    if [ -s "$f" ]; then
      log "--- the last lines of $f"
      tail -n 40 "$f" >&2 || true
    fi
  done
  log "--- epmd -names"
  timeout 10 epmd -names >&2 2>&1 || true
  log "--- rabbitmqctl ping"
  timeout 40 rabbitmqctl ping >&2 2>&1 || true
  log "--- getent hosts localhost $(hostname 2>/dev/null || true)"
  getent hosts localhost "$(hostname 2>/dev/null || echo localhost)" >&2 || true
  log "--- listening TCP sockets"
  (ss -ltnp 2>/dev/null || netstat -ltnp 2>/dev/null || true) >&2
}

# The node answers ping once it runs; a previous run may have left the app
# stopped (the broker-restart tests), so start_app is always issued. The
# deadline is wall-clock time: the calls inside the loop can each take
# seconds.
deadline=180
SECONDS=0
while [ "$SECONDS" -lt "$deadline" ]; do
  if ctl ping >/dev/null 2>&1; then
    ctl start_app >/dev/null 2>&1 || true
    left=$((deadline - SECONDS))
    [ "$left" -gt 30 ] && left=30
    [ "$left" -lt 5 ] && left=5
    if ctl await_startup --timeout "$left" >/dev/null 2>&1; then
      if [ "$(id -u)" -eq 0 ]; then
        rm -f "$tls_dir/restart-needed"
        # The EXTERNAL user: the test client certificate's CN, with no password.
        if ! ctl list_users 2>/dev/null | grep -q '^backstop-client'; then
          log "adding the user backstop-client (EXTERNAL, no password)"
          ctl add_user backstop-client "unused-$RANDOM$RANDOM" >/dev/null
          ctl clear_password backstop-client >/dev/null
          ctl set_permissions -p / backstop-client '.*' '.*' '.*' >/dev/null
        fi
      fi
      log "rabbitmq is ready on 127.0.0.1:5672 (TLS on 127.0.0.1:5671) as rabbit@localhost"
      exit 0
    fi
  fi
  sleep 1
done
diagnose "$deadline"
exit 1
