#!/usr/bin/env bash
# Side-by-side benchmark of secureops-proxy against squid and tinyproxy with the shared
# peer bench (/work/shared/bench, set up once with its setup.sh).
#
#   pep-proxy/bench/peerbench.sh                 # direct squid tinyproxy project-proxy
#   ONLY="direct squid project-proxy" RUNS=1 IDLE=1000,5000,10000 pep-proxy/bench/peerbench.sh
#
# The proxy runs in standalone allowlist mode with the bench's 100-entry allowlist
# (squid's ".domain" = the domain and its subdomains => "domain" + "*.domain"), the bench's
# hosts file as --resolve overrides (resolve once, dial the checked IP), and a durable audit
# spool (fdatasync group commit) in $SPOOL (default /tmp/sops-proxy-bench-spool; the peers
# log nothing: squid runs with access_log none). EXTRA adds flags (e.g. --no-attribution).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-/tmp/sops-proxy-bench-bin}
cp "$ROOT/target/release/secureops-proxy" "$BIN"
SPOOL=${SPOOL:-/tmp/sops-proxy-bench-spool}
rm -rf "$SPOOL"
export PROJECT_PROXY=${PROJECT_PROXY:-127.0.0.12:3128}
export PROJECT_PROXY_CMD="env SECUREOPS_ALLOW=$ALLOW SECUREOPS_RESOLVED_IP_ALLOW=127.0.0.0/8 SECUREOPS_RESOLVE=$RESOLVE RUST_LOG=warn $BIN --listen $PROJECT_PROXY --dns-server none --spool-dir $SPOOL ${EXTRA:-}"
export ONLY=${ONLY:-direct squid tinyproxy project-proxy}
exec "$B/scripts/run_all.sh"
