# Shared preamble of the proxy bench scripts; source it (`. "$(dirname "$0")/lib.sh"`).
#
# Sets B (the peer bench from ../shared/bench/setup.sh, $PB_BASE or /tmp/peerbench), S
# (its scripts), ROOT (this checkout), and ALLOW / RESOLVE: the bench's allowlist and its
# hosts file as secureops-proxy `--allow` / `--resolve` values, so our proxy decides on
# exactly what squid and tinyproxy are configured with. Defines the per-run meters:
#   cpu0, cpu1    busy ticks of that core so far (/proc/stat: user+nice+system+irq+softirq)
#   ticks PID...  user+system ticks of the processes;  ut PID: user ticks only
#   csw PID       context switches of every thread of PID
#   drain         wait until TIME_WAIT sockets are below 2,000 (a full table inflates rates)
B=${PB_BASE:-/tmp/peerbench}; S=$B/scripts
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ ! -f "$B/conf/allowlist.txt" ]; then
  echo "no peer bench at $B: run ../shared/bench/setup.sh first" >&2
  exit 1
fi
ALLOW=$(awk 'NF { if (substr($1,1,1)==".") { d=substr($1,2); printf "%s,*.%s,", d, d } else printf "%s,", $1 }' "$B/conf/allowlist.txt" | sed 's/,$//')
RESOLVE=$(awk '$1 ~ /^127\./ { for (i=2;i<=NF;i++) printf "%s=%s,", $i, $1 }' "$B/conf/hosts" | sed 's/,$//')
cpu0() { awk '/^cpu0 /{print $2+$3+$4+$7+$8}' /proc/stat; }
cpu1() { awk '/^cpu1 /{print $2+$3+$4+$7+$8}' /proc/stat; }
ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
ut() { awk '{print $14}' "/proc/$1/stat"; }
csw() { local t=0; for f in /proc/$1/task/*/status; do t=$((t + $(awk '/ctxt_switches/{s+=$2} END{print s}' "$f"))); done; echo $t; }
drain() { while [ "$(ss -Htan state time-wait | wc -l)" -gt 2000 ]; do sleep 2; done; sleep 2; }
