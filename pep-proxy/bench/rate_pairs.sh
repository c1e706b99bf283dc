#!/usr/bin/env bash
# Alternating squid / secureops-proxy tunnel-rate pairs (PAIRS=3, DUR=5 s each), CPU per
# tunnel from /proc/<pid>/stat. Each cell: TIME_WAIT backlog drained first, a fresh
# process, a 2 s warm-up, then the measured run. Proxy pinned to CPU 1, pb to CPU 0, the
# proxy as in quick_rate_bulk.sh (bench allowlist, --resolve overrides, durable spool).
#   bash pep-proxy/bench/rate_pairs.sh        (needs ../shared/bench set up: /tmp/peerbench)
set -u
. "$(dirname "$0")/lib.sh"
BIN=/tmp/sops-proxy-pairs-bin; cp "$ROOT/target/release/secureops-proxy" "$BIN"
DUR=${DUR:-5}
ulimit -n 65536 2>/dev/null
"$S/peers.sh" start world >/dev/null 2>&1
cell() { # name addr pids...
  local name=$1 addr=$2; shift 2
  taskset -c 0 "$B/bin/pb" rate --proxy "$addr" --targets "$B/conf/targets-allowed.txt" --concurrency 32 --duration 2 --mode ping >/dev/null 2>&1
  local t0; t0=$(ticks "$@")
  taskset -c 0 "$B/bin/pb" rate --proxy "$addr" --targets "$B/conf/targets-allowed.txt" --concurrency 32 --duration "$DUR" --mode ping >/tmp/pairs-pb.json 2>/dev/null
  local t1; t1=$(ticks "$@")
  python3 - "$name" "$t0" "$t1" <<'P'
import json, sys
name, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = json.loads(open('/tmp/pairs-pb.json').read().strip().splitlines()[-1])
print("%-14s tunnels/s %6.0f  p50 %5s us  errors %s  CPU/tunnel %.1f us" % (name, d['ok_per_s'], d['p50_us'], d['errors'], (t1 - t0) / 100 * 1e6 / max(1, d['ok'])))
P
}
for _ in $(seq 1 "${PAIRS:-3}"); do
  drain; "$S/peers.sh" start squid >/dev/null 2>&1; sleep 1
  cell squid 127.0.0.10:3128 $(pgrep -x squid); "$S/peers.sh" stop squid >/dev/null 2>&1
  drain; rm -rf /tmp/sops-pairs-spool
  SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$BIN" --listen 127.0.0.12:3128 \
    --dns-server none --spool-dir /tmp/sops-pairs-spool --no-attribution >/tmp/sops-pairs-proxy.log 2>&1 </dev/null &
  P=$!; sleep 1
  cell secureops-proxy 127.0.0.12:3128 $P; kill $P; wait $P 2>/dev/null
done
