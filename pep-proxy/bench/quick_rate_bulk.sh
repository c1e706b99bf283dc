#!/usr/bin/env bash
# Quiet-machine repeat of the side-by-side: rate + latency + bulk, direct / squid /
# secureops-proxy (default spool policy, then SYNC_ALWAYS=1 adds a rate-only run with
# --spool-sync always), RUNS=3 (needs ../shared/bench set up: /tmp/peerbench).
# Results table printed at the end.
set -u
. "$(dirname "$0")/lib.sh"
OUT=/tmp/sops-quick-results; rm -rf "$OUT"; mkdir -p "$OUT"
export PEER_CPU=1 LOAD_CPU=0
ulimit -n 65536
"$S/peers.sh" start world >/dev/null 2>&1
BIN=/tmp/sops-proxy-bench-bin; cp "$ROOT/target/release/secureops-proxy" "$BIN"
SPOOL=/tmp/sops-proxy-bench-spool
PA=127.0.0.12:3128
PX=(--runs "${RUNS:-3}" --duration 5 --out "$OUT" --tests rate,latency,bulk)
python3 "$S/bench_proxy.py" --direct --name direct "${PX[@]}"
"$S/peers.sh" start squid && sleep 1 && python3 "$S/bench_proxy.py" --proxy 127.0.0.10:3128 --name squid "${PX[@]}"
"$S/peers.sh" stop squid
rm -rf "$SPOOL"
SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$BIN" --listen $PA --dns-server none --spool-dir "$SPOOL" --no-attribution >/tmp/sops-quick-proxy.log 2>&1 </dev/null &
P=$!
sleep 1
python3 "$S/bench_proxy.py" --proxy $PA --name project-proxy "${PX[@]}"
kill $P
PROXIES=direct,squid,project-proxy
if [ -n "${SYNC_ALWAYS:-}" ]; then
  sleep 1; rm -rf "$SPOOL"
  SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$BIN" --listen $PA --dns-server none --spool-dir "$SPOOL" --spool-sync always --no-attribution >/tmp/sops-quick-proxy.log 2>&1 </dev/null &
  P=$!
  sleep 1
  python3 "$S/bench_proxy.py" --proxy $PA --name project-proxy-sync-always --runs "${RUNS:-3}" --duration 5 --out "$OUT" --tests rate,latency
  kill $P
  PROXIES=$PROXIES,project-proxy-sync-always
fi
python3 "$S/make_table.py" --dir "$OUT" --proxies $PROXIES
