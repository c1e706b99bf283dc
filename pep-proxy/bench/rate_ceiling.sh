#!/usr/bin/env bash
# How high can the bench's tunnel rate go at all? The shared bench pins the load
# generator and the upstream world to CPU 0 and the proxy under test to CPU 1, so a
# proxied tunnel's rate is capped by what CPU 0 spends per proxied tunnel (pb's
# CONNECT + echo + the world's accept/echo/close + the softirq work of the packets
# CPU 0 sends), whatever the proxy does. This measures, in one window, for direct,
# squid and secureops-proxy (same allowlist, same world, 32 closed-loop workers):
# tunnels/s, CPU-0 busy µs per tunnel (/proc/stat), and the proxy's CPU µs per
# tunnel (/proc/PID/stat), then prints the CPU-0 ceiling 1e6 / (CPU-0 µs per
# proxied tunnel) and the largest squid ratio this layout can show.
#
#   RUNS=3 DUR=6 pep-proxy/bench/rate_ceiling.sh   (needs ../shared/bench set up: /tmp/peerbench)
set -u
. "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}; DUR=${DUR:-6}
ulimit -n 65536 2>/dev/null
"$S/peers.sh" start world >/dev/null 2>&1
BIN=/tmp/sops-ceiling-bin; cp "$ROOT/target/release/secureops-proxy" "$BIN"
DIRECT=$(python3 -c "print(','.join(f'127.0.0.{i}:443' for i in range(2,10)))")
# one run: NAME, pids to charge (may be empty), pb target args...
one() {
  local name=$1 pids=$2; shift 2
  drain
  taskset -c 0 "$B/bin/pb" rate "$@" --concurrency 32 --duration 2 --mode ping >/dev/null 2>&1
  local c0 t0 c1 t1
  c0=$(cpu0); t0=$(ticks $pids)
  taskset -c 0 "$B/bin/pb" rate "$@" --concurrency 32 --duration "$DUR" --mode ping >/tmp/sops-ceiling.json 2>/dev/null
  c1=$(cpu0); t1=$(ticks $pids)
  python3 - "$name" "$c0" "$c1" "$t0" "$t1" <<'P'
import json, sys
name, c0, c1, t0, t1 = sys.argv[1], *map(int, sys.argv[2:])
d = json.loads(open('/tmp/sops-ceiling.json').read().strip().splitlines()[-1])
ok = max(1, d['ok'])
proxy = f"{(t1 - t0) * 1e4 / ok:.1f}" if t1 > t0 else "-"
print(f"{name} {d['ok_per_s']:.0f} {(c1 - c0) * 1e4 / ok:.1f} {proxy} {d['errors']}")
P
}
OUT=/tmp/sops-ceiling-results.txt; : >"$OUT"
for r in $(seq "$RUNS"); do
  one direct "" --direct "$DIRECT" | tee -a "$OUT"
  "$S/peers.sh" start squid >/dev/null 2>&1; sleep 1
  one squid "$(pgrep -x squid | tr '\n' ' ')" --proxy 127.0.0.10:3128 --targets "$B/conf/targets-allowed.txt" | tee -a "$OUT"
  "$S/peers.sh" stop squid >/dev/null 2>&1
  rm -rf /tmp/sops-ceiling-spool
  SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$BIN" --listen 127.0.0.12:3128 \
    --dns-server none --spool-dir /tmp/sops-ceiling-spool --no-attribution >/tmp/sops-ceiling-proxy.log 2>&1 </dev/null &
  P=$!; sleep 1
  one secureops-proxy "$P" --proxy 127.0.0.12:3128 --targets "$B/conf/targets-allowed.txt" | tee -a "$OUT"
  kill $P; wait $P 2>/dev/null
done
python3 - "$OUT" <<'P'
import statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    n, rate, c0, px, err = line.split()
    rows.setdefault(n, []).append((float(rate), float(c0), None if px == '-' else float(px)))
med = lambda xs: st.median(xs) if xs else float('nan')
print("\n| | tunnels/s | CPU 0 µs per tunnel | proxy CPU µs per tunnel |\n|---|---|---|---|")
for n, rs in rows.items():
    px = [r[2] for r in rs if r[2] is not None]
    print(f"| {n} | {med([r[0] for r in rs]):,.0f} | {med([r[1] for r in rs]):.1f} | {med(px):.1f} |" if px else
          f"| {n} | {med([r[0] for r in rs]):,.0f} | {med([r[1] for r in rs]):.1f} | – |")
sq, ours = rows.get('squid'), rows.get('secureops-proxy')
if sq and ours:
    ceiling = 1e6 / med([r[1] for r in ours])
    s = med([r[0] for r in sq]); o = med([r[0] for r in ours])
    print(f"\nsecureops-proxy / squid: {o / s:.2f}x tunnels/s, {med([r[2] for r in sq]) / med([r[2] for r in ours]):.2f}x less CPU per tunnel")
    print(f"CPU-0 ceiling for any proxied tunnel: {ceiling:,.0f}/s = {ceiling / s:.2f}x squid (largest ratio this layout can show); "
          f"secureops-proxy reaches {o / ceiling:.0%} of it")
P
