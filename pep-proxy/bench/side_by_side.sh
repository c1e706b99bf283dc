#!/usr/bin/env bash
# Same measurements as the shared run_all.sh (bench_proxy.py from /work/shared/bench), for
# direct, squid and secureops-proxy only, one after the other, into $OUT. Needs the upstream
# world running (peers.sh start world). The proxy command is built as in peerbench.sh:
# standalone allowlist = the bench's 100 entries, bench hosts file as --resolve overrides,
# durable audit spool (fdatasync group commit) on $SPOOL, EXTRA flags appended.
#   RUNS=1 IDLE=5000,10000 EXTRA=--no-attribution pep-proxy/bench/side_by_side.sh
set -u
. "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/sops-proxy-bench-results}; mkdir -p "$OUT"
RUNS=${RUNS:-1}; DURATION=${DURATION:-10}; IDLE=${IDLE:-5000,10000}
export PEER_CPU=${PEER_CPU-1} LOAD_CPU=${LOAD_CPU-0}
ulimit -n 65536
BIN=/tmp/sops-proxy-bench-bin; cp "$ROOT/target/release/secureops-proxy" "$BIN"
SPOOL=${SPOOL:-/tmp/sops-proxy-bench-spool}
PA=127.0.0.12:3128
start_proxy() {
  rm -rf "$SPOOL"
  SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn nohup setsid taskset -c "$PEER_CPU" \
    "$BIN" --listen $PA --dns-server none --spool-dir "$SPOOL" ${EXTRA:-} >"$B/logs/sops-proxy.out" 2>&1 </dev/null &
  echo $! >"$B/run/sops-proxy.pid"
  for _ in $(seq 1 100); do ss -Hltn | awk '{print $4}' | grep -qx "$PA" && return 0; sleep 0.1; done
  echo "proxy did not start" >&2; return 1
}
stop_proxy() { [ -f "$B/run/sops-proxy.pid" ] && kill "$(cat "$B/run/sops-proxy.pid")" 2>/dev/null; sleep 0.5; }
export -f start_proxy stop_proxy; export B BIN SPOOL ALLOW RESOLVE PA PEER_CPU EXTRA
PX=(--runs "$RUNS" --duration "$DURATION" --idle "$IDLE" --out "$OUT")
python3 "$S/bench_proxy.py" --direct --name direct "${PX[@]}" --tests rate,connect,latency,bulk
"$S/peers.sh" start squid && sleep 1 && python3 "$S/bench_proxy.py" --proxy 127.0.0.10:3128 --name squid "${PX[@]}" \
    --restart-cmd "$S/peers.sh stop squid; $S/peers.sh start squid"
"$S/peers.sh" stop squid
start_proxy && python3 "$S/bench_proxy.py" --proxy $PA --name project-proxy "${PX[@]}" \
    --restart-cmd "bash -c 'stop_proxy; start_proxy'"
stop_proxy
python3 "$S/make_table.py" --dir "$OUT" --proxies direct,squid,project-proxy > "$OUT/TABLE.md"; cat "$OUT/TABLE.md"
