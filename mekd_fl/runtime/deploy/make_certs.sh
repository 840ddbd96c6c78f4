#!/usr/bin/env bash
# Make a self-signed CA and a SuperLink server certificate signed by it, for Flower's Deployment Engine.
#
#   make_certs.sh OUT_DIR [SAN]
#
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key (and server.csr). SAN defaults to loopback
# ("IP:127.0.0.1,IP:::1,DNS:localhost"); on a real host give its names, e.g.
#   make_certs.sh certs "DNS:superlink.example.org,IP:203.0.113.7"
# The SuperLink takes --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key; every
# SuperNode and `flwr` client takes ca.crt as its root certificate. Keep ca.key and server.key private.
set -euo pipefail

out="${1:?usage: make_certs.sh OUT_DIR [SAN]}"
san="${2:-IP:127.0.0.1,IP:::1,DNS:localhost}"
days="${MAKE_CERTS_DAYS:-365}"
mkdir -p "$out"
cd "$out"
umask 077

openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days "$days" \
    -keyout ca.key -out ca.crt -subj "/CN=mekd-fl local CA" 2>/dev/null
openssl req -newkey rsa:2048 -sha256 -nodes \
    -keyout server.key -out server.csr -subj "/CN=mekd-fl superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.ext ca.srl
chmod 644 ca.crt server.pem
echo "certificates in $out: ca.crt server.pem server.key (SAN $san)"
