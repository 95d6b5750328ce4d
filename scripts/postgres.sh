#!/usr/bin/env bash
# Brings up a local PostgreSQL on 127.0.0.1:5432 with a `backstop` role and
# database, unless BACKSTOP_POSTGRES_URL names an existing server. Used by
# scripts/test for the PostgreSQL store suites; safe to run twice.
set -euo pipefail

log() { printf 'postgres: %s\n' "$*" >&2; }

if [ -n "${BACKSTOP_POSTGRES_URL:-}" ]; then
  log "using the server named by BACKSTOP_POSTGRES_URL"
  exit 0
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    log "postgresql is not installed and this user is not root;"
    log "install it (apt-get install postgresql) or set BACKSTOP_POSTGRES_URL"
    exit 2
  fi
  log "installing postgresql with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi

version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
# Loopback only.
conf="/etc/postgresql/$version/main/postgresql.conf"
if [ -w "$conf" ] && ! grep -q "^listen_addresses = '127.0.0.1'" "$conf"; then
  echo "listen_addresses = '127.0.0.1'" >>"$conf"
fi
if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
  log "starting PostgreSQL $version"
  pg_ctlcluster "$version" main start
fi

as_postgres() { su -s /bin/sh postgres -c "$1"; }
for _ in $(seq 1 30); do
  as_postgres "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
if [ "$(as_postgres "psql -qtAc \"select 1 from pg_roles where rolname = 'backstop'\"")" != "1" ]; then
  as_postgres "psql -qc \"create role backstop login password 'backstop' createdb\""
fi
if [ "$(as_postgres "psql -qtAc \"select 1 from pg_database where datname = 'backstop'\"")" != "1" ]; then
  as_postgres "createdb -O backstop backstop"
fi
log "PostgreSQL is ready on 127.0.0.1:5432 (postgres://backstop:***@127.0.0.1:5432/backstop)"
