#!/usr/bin/env bash
# Bulk through the null relay vs direct, with how busy each core was: shows which core
# limits a relayed bulk flow on the shared layout (pb + world on CPU 0, relay on CPU 1).
#
#   cargo build --release -p secureops-proxy --example null_relay
#   DIRS="down up" pep-proxy/bench/bulk_cpu.sh    (needs ../shared/bench set up: /tmp/peerbench)
. "$(dirname "$0")/lib.sh"
"$B/scripts/peers.sh" start world >/dev/null 2>&1
c() { awk -v c=cpu$1 '$1==c{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
run() { # label cmd...
  a0=($(c 0)); a1=($(c 1)); t0=$(date +%s.%N)
  g=$("$@" | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['Gbit_per_s'])")
  b0=($(c 0)); b1=($(c 1)); t1=$(date +%s.%N)
  python3 -c "
b0,i0,b1,i1=$((${b0[0]}-${a0[0]})),$((${b0[1]}-${a0[1]})),$((${b1[0]}-${a1[0]})),$((${b1[1]}-${a1[1]}))
print(f'$label {float($g):6.2f} Gbit/s  cpu0 busy {b0/(b0+i0)*100:4.0f}%  cpu1 busy {b1/(b1+i1)*100:4.0f}%')"
}
for d in ${DIRS:-down up}; do
label="direct-$d" run taskset -c 0 $B/bin/pb bulk --direct 127.0.0.2:443 --bytes 2147483648 --dir $d --timeout 120
setsid taskset -c 1 $ROOT/target/release/examples/null_relay 127.0.0.13:3128 "$RESOLVE" >/dev/null 2>&1 </dev/null & P=$!; sleep 0.5
label="relay-$d" run taskset -c 0 $B/bin/pb bulk --proxy 127.0.0.13:3128 --target bulk.example-allowed.test:443 --bytes 2147483648 --dir $d --timeout 120
kill $P; wait $P 2>/dev/null
done
