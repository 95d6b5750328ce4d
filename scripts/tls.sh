#!/usr/bin/env bash
# Generates the test PKI for the TLS suites into /etc/rabbitmq/backstop-tls:
#   ca.pem                 the test CA
#   server.pem/.key        the broker: IP 127.0.0.1 and DNS rabbit.backstop.test
#   client.pem/.key        CN backstop-client (PKCS#8 key), also the EXTERNAL user
#   expired.pem            a server certificate (key: server.key) valid 2020-2021
#   expired-client.pem     a client certificate (key: client.key) valid 2020-2021
#   other-ca.pem           an unrelated CA
# and writes the broker's TLS listener (127.0.0.1:5671, verify_peer,
# fail_if_no_peer_cert) and the EXTERNAL mechanism into rabbitmq.conf.
# Run by scripts/broker.sh before the broker starts; safe to run twice. When it
# changes the broker's configuration it creates $dir/restart-needed.
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

# Bump when the PKI's contents change, so that older set-ups are regenerated.
pki_version=2
if [ "$(cat version 2>/dev/null)" != "$pki_version" ]; then
  log "generating a test CA, server and client certificates in $dir"
  rm -f ./*.pem ./*.key ./*.csr ./*.ext ./*.srl index.txt* serial*
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=backstop test CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=unrelated CA" \
    -keyout other-ca.key -out other-ca.pem 2>/dev/null
  # The server certificate names 127.0.0.1 and rabbit.backstop.test only, so
  # `localhost` is a name mismatch the tests can provoke, and the server name
  # override has a name to ask for.
  openssl req -newkey rsa:2048 -nodes -subj "/CN=backstop test broker" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:rabbit.backstop.test\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile server.ext -out server.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=backstop-client" \
    -keyout client.key -out client.csr 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out client.pem 2>/dev/null
  # Expired certificates need a start date in the past, which only `openssl
  # ca` can set on OpenSSL 3.0.
  cat >ca.cnf <<CNF
[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
certificate = ca.pem
private_key = ca.key
serial = serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
CNF
  touch index.txt
  echo 1000 >serial
  openssl ca -batch -notext -config ca.cnf -startdate 20200101000000Z -enddate 20210101000000Z \
    -in server.csr -extfile server.ext -out expired.pem 2>/dev/null
  openssl ca -batch -notext -config ca.cnf -startdate 20200101000000Z -enddate 20210101000000Z \
    -in client.csr -extfile client.ext -out expired-client.pem 2>/dev/null
  # rustls reads PKCS#8 keys (and PKCS#1); PKCS#8 is the common ground.
  openssl pkcs8 -topk8 -nocrypt -in client.key -out client.pk8.key
  mv client.pk8.key client.key
  rm -f ./*.csr ./*.ext ./*.srl ./10*.pem index.txt* serial* ca.cnf
  echo "$pki_version" >version
  touch restart-needed
fi
chmod 644 ./*.pem
chmod 640 ./*.key
chgrp rabbitmq ./*.key 2>/dev/null || true
chmod 644 client.key

conf=/etc/rabbitmq/rabbitmq.conf
marker="# backstop TLS test listener, v$pki_version"
if [ -w "$(dirname "$conf")" ] && ! grep -qF "$marker" "$conf" 2>/dev/null; then
  log "writing the TLS listener on 127.0.0.1:5671 and EXTERNAL auth into $conf"
  if [ -f "$conf" ]; then
    # Drop what an older version of this script wrote.
    sed -i -e '/^# backstop TLS test listener/d' -e '/^listeners\.ssl\./d' -e '/^ssl_options\./d' \
      -e '/^auth_mechanisms\./d' -e '/^ssl_cert_login_from/d' "$conf"
  fi
  cat >>"$conf" <<CONF
$marker
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $dir/ca.pem
ssl_options.certfile = $dir/server.pem
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
CONF
  touch restart-needed
fi
# EXTERNAL needs its plugin; --offline only writes enabled_plugins, read at start.
if ! grep -q rabbitmq_auth_mechanism_ssl /etc/rabbitmq/enabled_plugins 2>/dev/null; then
  log "enabling rabbitmq_auth_mechanism_ssl"
  rabbitmq-plugins --offline enable rabbitmq_auth_mechanism_ssl >/dev/null
  touch restart-needed
fi
