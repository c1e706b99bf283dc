#!/usr/bin/env bash
# Alternating A/B of proxy builds (and the null relay) on the shared bench layout, with
# what each costs per tunnel: CPU 0 / CPU 1 busy µs, the proxy's own and user CPU µs,
# context switches, and the kernel's TCP segment counters (nstat).
#
#   cp target/release/secureops-proxy /tmp/proxy-old   # build A
#   ... change, rebuild ...; cp target/release/secureops-proxy /tmp/proxy-new   # build B
#   RUNS=3 NAMES="secureops-proxy-old secureops-proxy-new null-relay" pep-proxy/bench/ab_pairs.sh
#
# NAMES: secureops-proxy-<tag> runs /tmp/proxy-<tag>; null-relay runs examples/null_relay.
# EXTRA adds proxy flags; METRICS=host:port (with EXTRA=--metrics-listen host:port)
# prints the spool's append / deferred counters at the end of each run.
set -u
. "$(dirname "$0")/lib.sh"
DUR=${DUR:-5}; NAMES=${NAMES:-"null-relay secureops-proxy"}
"$S/peers.sh" start world >/dev/null 2>&1
PROXY=${PROXY:-$ROOT/target/release/secureops-proxy}; RELAY=$ROOT/target/release/examples/null_relay
EXTRA=${EXTRA:-}
for r in $(seq ${RUNS:-1}); do for name in $NAMES; do
  case $name in
    null-relay) A=127.0.0.13:3128; setsid taskset -c 1 "$RELAY" $A "$RESOLVE" >/dev/null 2>&1 </dev/null & P=$! ;;
    secureops-proxy*) A=127.0.0.12:3128; rm -rf /tmp/sops-cmp-spool; PROXY=/tmp/proxy-${name#secureops-proxy-}
      SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn setsid taskset -c 1 "$PROXY" \
        --listen $A --dns-server none --spool-dir /tmp/sops-cmp-spool --no-attribution $EXTRA >/dev/null 2>&1 </dev/null & P=$! ;;
  esac
  sleep 1; drain
  taskset -c 0 "$B/bin/pb" rate --proxy $A --targets "$B/conf/targets-allowed.txt" --concurrency 32 --duration 1 --mode ping >/dev/null 2>&1
  nstat -n; c0=$(cpu0); c1a=$(cpu1); t0=$(ticks $P); u0=$(ut $P); s0=$(csw $P)
  taskset -c 0 "$B/bin/pb" rate --proxy $A --targets "$B/conf/targets-allowed.txt" --concurrency 32 --duration "$DUR" --mode ping >/tmp/cmp.json 2>/dev/null
  c1=$(cpu0); c1b=$(cpu1); t1=$(ticks $P); u1=$(ut $P); s1=$(csw $P)
  nstat >/tmp/cmp-nstat-$name.txt
  [ -n "${METRICS:-}" ] && curl -s $METRICS/metrics | grep -E "spool_deferred_total|appends_total.*ok" | tr "\n" " "; kill $P; wait $P 2>/dev/null
  python3 - "$name" $c0 $c1 $t0 $t1 $s0 $s1 $c1a $c1b $u0 $u1 <<'PY'
import json, sys
name=sys.argv[1]; c0,c1,t0,t1,s0,s1,ca,cb,u0,u1=map(int,sys.argv[2:])
d=json.loads(open('/tmp/cmp.json').read().strip().splitlines()[-1]); ok=max(1,d['ok'])
ns={}
for l in open(f'/tmp/cmp-nstat-{name}.txt'):
    f=l.split()
    if len(f)>=2 and f[1].isdigit(): ns[f[0]]=int(f[1])
keys=['TcpOutSegs','TcpExtTCPPureAcks','TcpExtTCPHPAcks','TcpExtDelayedACKs','TcpExtTCPHPHits','TcpActiveOpens','TcpExtTCPAbortOnData','TcpOutRsts']
print(f"{name:18} {d['ok_per_s']:7.0f}/s cpu0 {(c1-c0)*1e4/ok:6.1f} cpu1 {(cb-ca)*1e4/ok:6.1f} own {(t1-t0)*1e4/ok:6.1f} user {(u1-u0)*1e4/ok:5.1f} csw {(s1-s0)/ok:5.2f} p50 {d.get('p50_us','?')} "+' '.join(f"{k[-10:]}={ns.get(k,0)/ok:.2f}" for k in keys))
PY
done; done
