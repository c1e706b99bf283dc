#!/usr/bin/env bash
# How much of secureops-proxy's cost is the policy path, and how much is relaying
# through a proxy at all? Alternates, in one window, the null relay (examples/
# null_relay.rs: CONNECT head → static table → dial → 200 → the proxy's own tunnel
# code; no policy, audit, attribution or metrics), secureops-proxy and squid, on the
# shared bench layout (pb and the world on CPU 0, the proxy under test on CPU 1,
# 32 closed-loop workers). Prints tunnels/s, CPU-0 µs and own CPU µs per tunnel,
# then bulk (1 GiB down and up) for direct, the null relay and secureops-proxy.
#
#   cargo build --release -p secureops-proxy --bins --example null_relay
#   RUNS=3 DUR=6 pep-proxy/bench/floor_pairs.sh    (needs ../shared/bench set up: /tmp/peerbench)
#   BULK=0 skips the bulk part; the summary also prints each run's own ours/squid ratio.
set -u
. "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}; DUR=${DUR:-6}; BYTES=${BYTES:-1073741824}; BULK=${BULK:-1}
"$S/peers.sh" start world >/dev/null 2>&1
PROXY=/tmp/sops-floor-proxy; RELAY=/tmp/sops-floor-relay
cp "$ROOT/target/release/secureops-proxy" "$PROXY"; cp "$ROOT/target/release/examples/null_relay" "$RELAY"
start() {  # NAME → sets P (pid) and A (address)
  case $1 in
    null-relay) A=127.0.0.13:3128; setsid taskset -c 1 "$RELAY" $A "$RESOLVE" >/dev/null 2>&1 </dev/null & P=$! ;;
    secureops-proxy) A=127.0.0.12:3128; rm -rf /tmp/sops-floor-spool
      SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$PROXY" \
        --listen $A --dns-server none --spool-dir /tmp/sops-floor-spool --no-attribution >/dev/null 2>&1 </dev/null & P=$! ;;
    squid) A=127.0.0.10:3128; "$S/peers.sh" start squid >/dev/null 2>&1; P=$(pgrep -x squid | tr '\n' ' ') ;;
  esac
  sleep 1
}
stop() { if [ "$1" = squid ]; then "$S/peers.sh" stop squid >/dev/null 2>&1; else kill $P; wait $P 2>/dev/null; fi; }
OUT=/tmp/sops-floor-results.txt; : >"$OUT"
for r in $(seq "$RUNS"); do for name in null-relay secureops-proxy squid; do
  start $name; drain
  taskset -c 0 "$B/bin/pb" rate --proxy $A --targets "$B/conf/targets-allowed.txt" --concurrency 32 --duration 2 --mode ping >/dev/null 2>&1
  c0=$(cpu0); t0=$(ticks $P)
  taskset -c 0 "$B/bin/pb" rate --proxy $A --targets "$B/conf/targets-allowed.txt" --concurrency 32 --duration "$DUR" --mode ping >/tmp/sops-floor.json 2>/dev/null
  c1=$(cpu0); t1=$(ticks $P)
  stop $name
  python3 - "$name" "$c0" "$c1" "$t0" "$t1" <<'PY' | tee -a "$OUT"
import json, sys
name, c0, c1, t0, t1 = sys.argv[1], *map(int, sys.argv[2:])
d = json.loads(open('/tmp/sops-floor.json').read().strip().splitlines()[-1])
ok = max(1, d['ok'])
print(f"rate {name} {d['ok_per_s']:.0f} {(c1 - c0) * 1e4 / ok:.1f} {(t1 - t0) * 1e4 / ok:.1f} {d['errors']}")
PY
done; done
gbit() { python3 -c "import json,sys; print(json.loads(sys.stdin.read())['Gbit_per_s'])"; }
[ "$BULK" = 0 ] || for r in $(seq "$RUNS"); do for d in down up; do
  echo "bulk $d direct $(taskset -c 0 "$B/bin/pb" bulk --direct 127.0.0.2:443 --bytes "$BYTES" --dir $d --timeout 120 | gbit)" | tee -a "$OUT"
  for name in null-relay secureops-proxy; do
    start $name
    echo "bulk $d $name $(taskset -c 0 "$B/bin/pb" bulk --proxy $A --target bulk.example-allowed.test:443 --bytes "$BYTES" --dir $d --timeout 120 | gbit)" | tee -a "$OUT"
    stop $name
  done
done; done
python3 - "$OUT" <<'PY'
import statistics as st, sys
rate, bulk = {}, {}
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == 'rate':
        rate.setdefault(f[1], []).append(tuple(map(float, f[2:5])))
    elif f[0] == 'bulk':
        bulk.setdefault((f[1], f[2]), []).append(float(f[3]))
m = st.median
print("\n| | tunnels/s | CPU 0 µs per tunnel | own CPU µs per tunnel |\n|---|---|---|---|")
for n, rs in rate.items():
    print(f"| {n} | {m([r[0] for r in rs]):,.0f} | {m([r[1] for r in rs]):.1f} | {m([r[2] for r in rs]):.1f} |")
if 'squid' in rate and 'secureops-proxy' in rate and 'null-relay' in rate:
    s = m([r[0] for r in rate['squid']])
    print(f"\nvs squid: null relay {m([r[0] for r in rate['null-relay']]) / s:.2f}x, "
          f"secureops-proxy {m([r[0] for r in rate['secureops-proxy']]) / s:.2f}x tunnels/s")
    pairs = [o[0] / q[0] for o, q in zip(rate['secureops-proxy'], rate['squid'])]
    print("per run, ours / squid (same window): " + ", ".join(f"{x:.2f}x" for x in pairs)
          + f"; median {m(pairs):.2f}x")
if not bulk:
    sys.exit(0)
print("\n| bulk | direct | null relay | secureops-proxy |\n|---|---|---|---|")
for d in ('down', 'up'):
    dr = m(bulk.get((d, 'direct'), [float('nan')]))
    nr = m(bulk.get((d, 'null-relay'), [float('nan')]))
    sp = m(bulk.get((d, 'secureops-proxy'), [float('nan')]))
    print(f"| {d} | {dr:.2f} Gbit/s | {nr:.2f} ({nr / dr:.0%}) | {sp:.2f} ({sp / dr:.0%}) |")
PY
