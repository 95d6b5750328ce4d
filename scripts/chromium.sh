#!/usr/bin/env bash
# Installs Debian's headless browser for the review console's end-to-end
# tests (crates/backstop-cli/tests/console.rs): `chromium` and
# `chromium-driver` (chromedriver), with apt-get, when either is missing.
# BACKSTOP_CHROMIUM / BACKSTOP_CHROMEDRIVER may name other binaries instead.
# Quiet and safe to run twice.
set -euo pipefail

log() { printf 'chromium: %s\n' "$*" >&2; }

browser=${BACKSTOP_CHROMIUM:-chromium}
driver=${BACKSTOP_CHROMEDRIVER:-chromedriver}
if command -v "$browser" >/dev/null 2>&1 && command -v "$driver" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  log "chromium or chromedriver is missing and this user is not root;"
  log "install them (apt-get install chromium chromium-driver) or set"
  log "BACKSTOP_CHROMIUM and BACKSTOP_CHROMEDRIVER"
  exit 2
fi
log "installing chromium and chromium-driver with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
log "$(chromedriver --version | head -n 1)"
