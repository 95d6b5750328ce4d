#!/usr/bin/env bash
# Brings up a local Redis on 127.0.0.1:6379 for the Redis dedup suites,
# unless BACKSTOP_REDIS_URL names an existing server. Safe to run twice.
set -euo pipefail

log() { printf 'redis: %s\n' "$*" >&2; }

if [ -n "${BACKSTOP_REDIS_URL:-}" ]; then
  log "using the server named by BACKSTOP_REDIS_URL"
  exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    log "redis-server is not installed and this user is not root;"
    log "install it (apt-get install redis-server) or set BACKSTOP_REDIS_URL"
    exit 2
  fi
  log "installing redis-server with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server redis-tools >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis-server on 127.0.0.1:6379"
  # Loopback only; the tests need no persistence.
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' \
    --appendonly no --logfile /tmp/backstop-redis.log
fi
for _ in $(seq 1 30); do
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
  sleep 0.2
done
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
log "Redis is ready on 127.0.0.1:6379"
