#!/usr/bin/env bash
# Thin wrapper: runs the `testnet` binary of hil-tests from any directory.
#   sudo hil-tests/testnet.sh up [--udp-port 443]   # bring a set up; Ctrl-C tears it down
#   sudo hil-tests/testnet.sh clean                 # remove sets whose owner process died
# Needs root (network namespaces, nftables). See hil-tests/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# exec: cargo run execs the binary in turn, so Ctrl-C and SIGTERM reach `testnet` itself.
exec cargo run -q -p hil-tests --bin testnet -- "$@"
