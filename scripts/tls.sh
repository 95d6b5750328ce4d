#!/usr/bin/env bash
# Generates the test PKI for the TLS suites (a CA, a server certificate for
# 127.0.0.1, a client certificate, and an unrelated CA) into
# /etc/rabbitmq/backstop-tls, and writes the broker's TLS listener
# (127.0.0.1:5671, verify_peer, fail_if_no_peer_cert) into rabbitmq.conf.
# Run by scripts/broker.sh before the broker starts; safe to run twice.
set -euo pipefail

log() { printf 'tls: %s\n' "$*" >&2; }

if ! command -v openssl >/dev/null 2>&1; then
  log "installing openssl with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openssl >/dev/null
fi

dir=${BACKSTOP_TLS_DIR:-/etc/rabbitmq/backstop-tls}
mkdir -p "$dir"
cd "$dir"

if [ ! -s ca.pem ] || [ ! -s client.key ] || [ ! -s other-ca.pem ]; then
  log "generating a test CA, server and client certificates in $dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=backstop test CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=unrelated CA" \
    -keyout other-ca.key -out other-ca.pem 2>/dev/null
  # The server certificate names 127.0.0.1 only, so `localhost` is a name
  # mismatch the tests can provoke.
  openssl req -newkey rsa:2048 -nodes -subj "/CN=backstop test broker" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile server.ext -out server.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=backstop-client" \
    -keyout client.key -out client.csr 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out client.pem 2>/dev/null
  # rustls wants PKCS#8 keys.
  openssl pkcs8 -topk8 -nocrypt -in client.key -out client.pk8.key
  mv client.pk8.key client.key
  rm -f ./*.csr ./*.ext ./*.srl
fi
chmod 644 ./*.pem
chmod 640 ./*.key
chgrp rabbitmq ./*.key 2>/dev/null || true
chmod 644 client.key

conf=/etc/rabbitmq/rabbitmq.conf
if [ -w "$(dirname "$conf")" ] && ! grep -q '^listeners.ssl.default' "$conf" 2>/dev/null; then
  log "adding the TLS listener on 127.0.0.1:5671 to $conf"
  cat >>"$conf" <<CONF
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $dir/ca.pem
ssl_options.certfile = $dir/server.pem
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
fi
