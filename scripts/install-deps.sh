#!/usr/bin/env bash
# Installs the Debian packages svsp builds and tests with (needs root or sudo).
set -euo pipefail
PACKAGES=(libaio-dev libisal-dev fio util-linux qemu-utils libnbd-bin nbdkit openssl iproute2 iperf3 dpkg-dev debootstrap systemd) # nbdkit: benchmarks/nbd-vs-peers only; openssl: a TLS-PSK client for the replication link tests; iproute2, iperf3: shaped links (tests, benchmarks/async-link); dpkg-dev, debootstrap, systemd: scripts/build-release and the install test (dpkg-shlibdeps, a Debian root, systemd-analyze)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "install-deps: ${PACKAGES[*]} present"
