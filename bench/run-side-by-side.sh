#!/usr/bin/env bash
# Side-by-side benchmark: SecureOps' proxy and DNS sinkhole against squid, tinyproxy,
# dnsmasq and unbound configured with the same 100-entry allowlist, in ONE run, on
# loopback (see ../shared/bench/README.md). Results: $PB_BASE/results, table printed.
#
#   bash bench/run-side-by-side.sh            # everything (takes ~30-40 min on 2 cores)
#   ONLY="direct squid project-proxy" bash bench/run-side-by-side.sh
#
# Needs root (peers bind 127.0.0.x:53, taskset, apt for the peers on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/bench}
B=${PB_BASE:-/tmp/peerbench}
[ -x "$B/scripts/run_all.sh" ] || bash "$SHARED/setup.sh"
cargo build --release -p secureops-proxy -p secureops-dns -p secureops-policy --bins
T=$(pwd)/target/release
POLICY=$B/conf/secureops-policy.yaml
W=$(mktemp -d /tmp/so-bench.XXXXXX)
# The PDP with the same allowlist, on loopback, pinned away from the proxy under test.
taskset -c "${LOAD_CPU:-0}" "$T/secureops-pdp" --listen 127.0.0.1:7400 --admin-listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --data-dir "$W/pdp" --policy "$POLICY" >"$W/pdp.out" 2>"$W/pdp.log" &
PDP=$!
trap 'kill $PDP 2>/dev/null || true; rm -rf "$W"' EXIT
sleep 1
export PROJECT_PROXY=127.0.0.12:3128
export PROJECT_PROXY_CMD="$T/secureops-proxy --listen 127.0.0.12:3128 --pdp http://127.0.0.1:7400 --spool-dir $W/spool-proxy --dns-server 127.0.0.53:53 --log-format json"
export PROJECT_DNS=127.0.0.56:53
export PROJECT_DNS_CMD="$T/secureops-dns --listen 127.0.0.56:53 --upstream 127.0.0.53:53 --pdp http://127.0.0.1:7400 --spool-dir $W/spool-dns --log-format json"
ONLY=${ONLY:-"direct squid tinyproxy project-proxy reflect dnsmasq unbound project-dns"} "$B/scripts/run_all.sh"
python3 "$B/scripts/make_table.py" --dir "$B/results" \
  --proxies direct,squid,tinyproxy,project-proxy --dns reflect,dnsmasq,unbound,project-dns
