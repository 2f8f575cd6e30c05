#!/usr/bin/env bash
# Installs the Debian bookworm packages Cistern needs to build, test and run its demo.
# Uses sudo when not root. Installs only what is missing.
set -euo pipefail
pkgs=(build-essential cmake pkg-config
      libsqlite3-dev libyaml-dev libzstd-dev libprotobuf-c-dev protobuf-c-compiler
      libcurl4-openssl-dev libmicrohttpd-dev libgnutls28-dev libmbedtls-dev libpaho-mqtt-dev libpq-dev
      libcmocka-dev python3 openssl sqlite3 curl mosquitto mosquitto-clients valgrind
      man-db systemd slowhttptest
      iproute2 nftables libfaketime)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
