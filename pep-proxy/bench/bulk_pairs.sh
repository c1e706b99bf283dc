#!/usr/bin/env bash
# Bulk through one tunnel vs direct, in alternating pairs (RUNS pairs per direction, BYTES
# each), proxy pinned to CPU 1, pb and the upstream world on CPU 0, as in the shared bench.
# With PERF=1 it also records `perf -C 0` (the load core) for one proxied and one direct
# transfer, to /tmp/perf-bulk-proxy.data and /tmp/perf-bulk-direct.data.
#   RUNS=3 pep-proxy/bench/bulk_pairs.sh        (needs ../shared/bench set up: /tmp/peerbench)
set -u
. "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}; BYTES=${BYTES:-1073741824}
"$S/peers.sh" start world >/dev/null 2>&1
BIN=/tmp/sops-bulk-bin; cp "$ROOT/target/release/secureops-proxy" "$BIN"; rm -rf /tmp/sops-bulk-spool
SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$BIN" --listen 127.0.0.12:3128 \
  --dns-server none --spool-dir /tmp/sops-bulk-spool --no-attribution >/dev/null 2>&1 </dev/null &
P=$!; sleep 1
gbit() { python3 -c "import json,sys; print(json.loads(sys.stdin.read())['Gbit_per_s'])"; }
direct() { taskset -c 0 "$B/bin/pb" bulk --direct 127.0.0.2:443 --bytes "$BYTES" --dir "$1" --timeout 120 | gbit; }
proxied() { taskset -c 0 "$B/bin/pb" bulk --proxy 127.0.0.12:3128 --target bulk.example-allowed.test:443 --bytes "$BYTES" --dir "$1" --timeout 120 | gbit; }
for r in $(seq "$RUNS"); do for d in down up; do
  a=$(direct $d); b=$(proxied $d)
  echo "$d direct $a proxy $b = $(python3 -c "print(f'{$b/$a:.0%}')") of direct"
done; done
if [ -n "${PERF:-}" ]; then
  perf record -e cpu-clock -g -C 0 -o /tmp/perf-bulk-proxy.data -- sleep 0.6 >/dev/null 2>&1 & PP=$!
  BYTES=4294967296 proxied down >/dev/null; wait $PP
  perf record -e cpu-clock -g -C 0 -o /tmp/perf-bulk-direct.data -- sleep 0.6 >/dev/null 2>&1 & PP=$!
  BYTES=4294967296 direct down >/dev/null; wait $PP
  echo "perf: perf report -i /tmp/perf-bulk-{proxy,direct}.data --no-children --sort sym -g none"
fi
kill $P
