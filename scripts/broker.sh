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

# Loopback only: the broker, epmd and the Erlang distribution port never
# listen on another address.
conf=/etc/rabbitmq/rabbitmq-env.conf
if [ -w "$(dirname "$conf")" ] && ! grep -q '^NODE_IP_ADDRESS=127.0.0.1' "$conf" 2>/dev/null; then
  {
    echo 'NODE_IP_ADDRESS=127.0.0.1'
    echo 'NODE_PORT=5672'
    echo 'export ERL_EPMD_ADDRESS=127.0.0.1'
    echo 'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"'
  } >>"$conf"
fi

# The TLS listener (127.0.0.1:5671), EXTERNAL auth and the test certificates.
# A running broker is restarted when tls.sh changed its configuration.
tls_dir=${BACKSTOP_TLS_DIR:-/etc/rabbitmq/backstop-tls}
if [ "$(id -u)" -eq 0 ]; then
  bash "$(dirname "$0")/tls.sh"
  if [ -e "$tls_dir/restart-needed" ] && rabbitmqctl -q status >/dev/null 2>&1; then
    log "restarting rabbitmq to apply the TLS configuration"
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do
      rabbitmqctl -q status >/dev/null 2>&1 || break
      sleep 1
    done
  fi
fi

if rabbitmqctl -q status >/dev/null 2>&1; then
  log "rabbitmq is running"
else
  log "starting rabbitmq-server"
  if [ "$(id -u)" -eq 0 ]; then
    # The init script is refused by policy-rc.d in containers; start the node
    # directly as the rabbitmq user, detached.
    su -s /bin/sh rabbitmq -c 'ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached' >/dev/null 2>&1 ||
      ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached
  else
    ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached
  fi
fi

# The node answers ping once it runs; a previous run may have left the app
# stopped (the broker-restart tests), so start_app is always issued.
for _ in $(seq 1 60); do
  if rabbitmqctl -q ping >/dev/null 2>&1; then
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
    if rabbitmqctl -q await_startup --timeout 30 >/dev/null 2>&1; then
      if [ "$(id -u)" -eq 0 ]; then
        rm -f "$tls_dir/restart-needed"
        # The EXTERNAL user: the test client certificate's CN, with no password.
        if ! rabbitmqctl -q list_users 2>/dev/null | grep -q '^backstop-client'; then
          log "adding the user backstop-client (EXTERNAL, no password)"
          rabbitmqctl -q add_user backstop-client "unused-$RANDOM$RANDOM" >/dev/null
          rabbitmqctl -q clear_password backstop-client >/dev/null
          rabbitmqctl -q set_permissions -p / backstop-client '.*' '.*' '.*' >/dev/null
        fi
      fi
      log "rabbitmq is ready on 127.0.0.1:5672 (TLS on 127.0.0.1:5671)"
      exit 0
    fi
  fi
  sleep 1
done
log "rabbitmq did not start within 60 s; see /var/log/rabbitmq/"
exit 1
