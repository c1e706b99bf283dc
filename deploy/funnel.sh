#!/bin/sh
# SecureOps transparent egress funnel.
#
# Installs packet-filter rules in the CURRENT network namespace so that every
# outbound packet of the workload either reaches a local SecureOps enforcement
# point (PEP) or is dropped:
#
#   * TCP to any port (except 53)         -> REDIRECT to the proxy's transparent
#                                            listener (default 7481)
#   * UDP 53 and TCP 53                   -> REDIRECT to the DNS sinkhole (7453)
#   * traffic of the exempt UIDs/GIDs     -> passes untouched (the sidecars dial
#                                            the real upstreams / the PDP)
#   * traffic to this namespace's own
#     addresses (loopback, pod IP)        -> passes, except DNS (port 53 is
#                                            redirected even to a local resolver
#                                            such as Docker's 127.0.0.11) and
#                                            the --deny-local addresses
#   * replies on connections accepted
#     from outside (established/related)  -> pass
#   * everything else                     -> DROPPED: other UDP (incl. QUIC on
#                                            443), ICMP, SCTP, raw IP, and IPv6
#                                            (unless --ipv6 redirect)
#
# Why REDIRECT and not TPROXY: REDIRECT works on locally generated traffic in
# the OUTPUT hook without policy routing, and the proxy recovers the original
# destination with SO_ORIGINAL_DST (conntrack), which is what secureops-proxy's
# transparent listener reads.
#
# Backends: nftables (primary, one atomic transaction in its own table
# `inet secureops_funnel`, so it never touches anybody else's rules) or
# iptables/ip6tables (fallback, own chains SECUREOPS_NAT / SECUREOPS_OUT hooked
# from OUTPUT; works with both iptables-nft and iptables-legacy).
#
# Idempotent: `install` replaces any previous funnel atomically (nft) or
# flushes and refills its own chains (iptables); `remove` deletes only what
# `install` created and succeeds when nothing is installed.
#
# Usage: funnel.sh [install|remove|status|print] [options]
# Run `funnel.sh --help` for options. Needs CAP_NET_ADMIN (and CAP_NET_RAW for
# the iptables backend) in the target network namespace, nothing else.
set -eu

PROG=$(basename "$0")
TABLE=secureops_funnel
NAT_CHAIN=SECUREOPS_NAT
OUT_CHAIN=SECUREOPS_OUT

usage() {
    cat <<EOF
Usage: $PROG [install|remove|status|print] [options]

Subcommands:
  install   install (or atomically replace) the funnel in the current netns
  remove    remove the funnel (no error when it is not installed)
  status    show the installed rules; exit 1 when the funnel is not installed
  print     print the nftables ruleset that install would load (no root needed)

Options (each also settable through the environment variable shown):
  --backend nft|iptables   SECUREOPS_FUNNEL_BACKEND   (default: nft)
  --proxy-port N           SECUREOPS_FUNNEL_PROXY_PORT (default: 7481, the
                           proxy's --transparent-listen port)
  --dns-port N             SECUREOPS_FUNNEL_DNS_PORT  (default: 7453)
  --exempt-uid N[,N..]     SECUREOPS_FUNNEL_EXEMPT_UID (default: 1337; repeatable)
  --exempt-gid N[,N..]     SECUREOPS_FUNNEL_EXEMPT_GID (default: none; repeatable)
  --deny-local ADDR[,..]   SECUREOPS_FUNNEL_DENY_LOCAL (default: none; repeatable)
                           local addresses/CIDRs the workload may not reach
                           even though they are local, e.g. 127.0.0.11 (Docker's
                           embedded resolver, whose TCP/UDP ports are random and
                           would otherwise be a DNS path around the sinkhole)
  --ipv6 drop|redirect     SECUREOPS_FUNNEL_IPV6      (default: drop)
                           drop: all IPv6 except loopback/local and exempt
                           traffic is dropped. redirect: IPv6 TCP and DNS are
                           redirected to [::1] like IPv4 (the proxy and the
                           sinkhole must then also listen on ::1).
  -h, --help               this help

The exempt UID/GID must be the identity the proxy, sinkhole and sensor run as;
never the workload's. Anything running as an exempt identity bypasses the funnel.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

BACKEND=${SECUREOPS_FUNNEL_BACKEND:-nft}
PROXY_PORT=${SECUREOPS_FUNNEL_PROXY_PORT:-7481}
DNS_PORT=${SECUREOPS_FUNNEL_DNS_PORT:-7453}
EXEMPT_UIDS=${SECUREOPS_FUNNEL_EXEMPT_UID:-1337}
EXEMPT_GIDS=${SECUREOPS_FUNNEL_EXEMPT_GID:-}
IPV6=${SECUREOPS_FUNNEL_IPV6:-drop}
DENY_LOCAL=${SECUREOPS_FUNNEL_DENY_LOCAL:-}
CMD=
uid_flag_seen=0
gid_flag_seen=0
deny_flag_seen=0

while [ $# -gt 0 ]; do
    case "$1" in
        install|remove|status|print)
            [ -z "$CMD" ] || die "only one subcommand allowed"
            CMD=$1 ;;
        --backend) [ $# -ge 2 ] || die "$1 needs a value"; BACKEND=$2; shift ;;
        --backend=*) BACKEND=${1#*=} ;;
        --proxy-port) [ $# -ge 2 ] || die "$1 needs a value"; PROXY_PORT=$2; shift ;;
        --proxy-port=*) PROXY_PORT=${1#*=} ;;
        --dns-port) [ $# -ge 2 ] || die "$1 needs a value"; DNS_PORT=$2; shift ;;
        --dns-port=*) DNS_PORT=${1#*=} ;;
        --exempt-uid|--exempt-uid=*)
            if [ "$1" = --exempt-uid ]; then [ $# -ge 2 ] || die "$1 needs a value"; v=$2; shift; else v=${1#*=}; fi
            if [ $uid_flag_seen = 0 ]; then EXEMPT_UIDS=$v; uid_flag_seen=1; else EXEMPT_UIDS="$EXEMPT_UIDS,$v"; fi ;;
        --exempt-gid|--exempt-gid=*)
            if [ "$1" = --exempt-gid ]; then [ $# -ge 2 ] || die "$1 needs a value"; v=$2; shift; else v=${1#*=}; fi
            if [ $gid_flag_seen = 0 ]; then EXEMPT_GIDS=$v; gid_flag_seen=1; else EXEMPT_GIDS="$EXEMPT_GIDS,$v"; fi ;;
        --deny-local|--deny-local=*)
            if [ "$1" = --deny-local ]; then [ $# -ge 2 ] || die "$1 needs a value"; v=$2; shift; else v=${1#*=}; fi
            if [ $deny_flag_seen = 0 ]; then DENY_LOCAL=$v; deny_flag_seen=1; else DENY_LOCAL="$DENY_LOCAL,$v"; fi ;;
        --ipv6) [ $# -ge 2 ] || die "$1 needs a value"; IPV6=$2; shift ;;
        --ipv6=*) IPV6=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
CMD=${CMD:-install}

is_port() {
    case "$1" in ''|*[!0-9]*) return 1 ;; esac
    [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}
is_id_list() {
    case "$1" in ''|*[!0-9,]*|,*|*,|*,,*) return 1 ;; esac
    return 0
}
is_port "$PROXY_PORT" || die "invalid --proxy-port: $PROXY_PORT"
is_port "$DNS_PORT" || die "invalid --dns-port: $DNS_PORT"
[ "$PROXY_PORT" != "$DNS_PORT" ] || die "--proxy-port and --dns-port must differ"
is_id_list "$EXEMPT_UIDS" || die "invalid --exempt-uid: '$EXEMPT_UIDS' (numeric, comma separated)"
[ -z "$EXEMPT_GIDS" ] || is_id_list "$EXEMPT_GIDS" || die "invalid --exempt-gid: '$EXEMPT_GIDS'"
case "$DENY_LOCAL" in *[!0-9a-fA-F.:/,]*) die "invalid --deny-local: '$DENY_LOCAL' (IP or CIDR list)" ;; esac
case ",$DENY_LOCAL," in *,,*) [ -z "$DENY_LOCAL" ] || die "invalid --deny-local: '$DENY_LOCAL'" ;; esac
case "$IPV6" in drop|redirect) ;; *) die "invalid --ipv6: $IPV6 (drop|redirect)" ;; esac
case "$BACKEND" in nft|nftables) BACKEND=nft ;; iptables) ;; *) die "invalid --backend: $BACKEND (nft|iptables)" ;; esac

# Exempting root would let any root process of the workload bypass the funnel.
# It is allowed (a sensor may have to run as root) but shouted about.
case ",$EXEMPT_UIDS," in *,0,*) echo "$PROG: warning: UID 0 is exempt: the workload must never run as root" >&2 ;; esac

# ---------------------------------------------------------------- nftables --

nft_set() { # "1,2" -> "{ 1, 2 }"
    echo "{ $(echo "$1" | sed 's/,/, /g') }"
}

nft_ruleset() {
    uids=$(nft_set "$EXEMPT_UIDS")
    # The first two lines make the transaction idempotent: create the table if
    # missing, then delete it, then recreate it with the full content, all in
    # one atomic commit (no window without rules).
    echo "table inet $TABLE"
    echo "delete table inet $TABLE"
    echo "table inet $TABLE {"
    echo "    chain funnel_nat {"
    # -110: before any other dstnat chain (-100), e.g. Docker's DNAT of
    # 127.0.0.11:53, so that the first NAT binding of a connection is ours.
    echo "        type nat hook output priority -110; policy accept;"
    echo "        meta skuid $uids return comment \"sidecars dial real upstreams\""
    if [ -n "$EXEMPT_GIDS" ]; then
        echo "        meta skgid $(nft_set "$EXEMPT_GIDS") return"
    fi
    # DNS first: a query to a local resolver goes to the sinkhole as well.
    echo "        meta nfproto ipv4 udp dport 53 redirect to :$DNS_PORT"
    echo "        meta nfproto ipv4 tcp dport 53 redirect to :$DNS_PORT"
    if [ "$IPV6" = redirect ]; then
        echo "        meta nfproto ipv6 udp dport 53 redirect to :$DNS_PORT"
        echo "        meta nfproto ipv6 tcp dport 53 redirect to :$DNS_PORT"
    fi
    echo "        fib daddr type local return comment \"loopback and own addresses\""
    echo "        meta nfproto ipv4 meta l4proto tcp redirect to :$PROXY_PORT"
    if [ "$IPV6" = redirect ]; then
        echo "        meta nfproto ipv6 meta l4proto tcp redirect to :$PROXY_PORT"
    fi
    echo "    }"
    echo "    chain funnel_out {"
    # Priority 0 runs after the nat chain: a redirected packet already carries
    # its local destination here. `oif` still names the original device in the
    # OUTPUT hook (routing is redone after NAT), hence `fib daddr type local`.
    echo "        type filter hook output priority 0; policy drop;"
    echo "        meta skuid $uids accept"
    if [ -n "$EXEMPT_GIDS" ]; then
        echo "        meta skgid $(nft_set "$EXEMPT_GIDS") accept"
    fi
    for a in $(echo "$DENY_LOCAL" | tr ',' ' '); do
        case "$a" in *:*) echo "        ip6 daddr $a drop" ;; *) echo "        ip daddr $a drop" ;; esac
    done
    echo "        fib daddr type local accept comment \"loopback, own addresses, redirected\""
    echo "        ct state established,related accept comment \"replies to accepted inbound connections\""
    echo "        counter drop comment \"secureops funnel: not proxied\""
    echo "    }"
    echo "}"
}

nft_install() {
    nft_ruleset | nft -f - || die "nft failed to load the funnel ruleset"
}

nft_remove() {
    # Same idempotence trick: succeeds whether or not the table exists.
    printf 'table inet %s\ndelete table inet %s\n' "$TABLE" "$TABLE" | nft -f - \
        || die "nft failed to remove table inet $TABLE"
}

nft_status() {
    nft list table inet "$TABLE" 2>/dev/null || { echo "funnel not installed (nft table inet $TABLE missing)" >&2; exit 1; }
}

# ---------------------------------------------------------------- iptables --

ipt_each_id() { # $1: list, prints one id per line
    echo "$1" | tr ',' '\n'
}

# $1: iptables|ip6tables, $2: 4|6
ipt_install_family() {
    ipt=$1 fam=$2
    command -v "$ipt" >/dev/null 2>&1 || die "$ipt not found"
    for t in nat filter; do
        if [ $t = nat ]; then ch=$NAT_CHAIN; else ch=$OUT_CHAIN; fi
        "$ipt" -w -t $t -N $ch 2>/dev/null || true
        "$ipt" -w -t $t -F $ch
    done
    # nat: decide what is redirected.
    for u in $(ipt_each_id "$EXEMPT_UIDS"); do
        "$ipt" -w -t nat -A $NAT_CHAIN -m owner --uid-owner "$u" -j RETURN
    done
    for g in $(ipt_each_id "$EXEMPT_GIDS"); do
        "$ipt" -w -t nat -A $NAT_CHAIN -m owner --gid-owner "$g" -j RETURN
    done
    if [ "$fam" = 4 ] || [ "$IPV6" = redirect ]; then
        "$ipt" -w -t nat -A $NAT_CHAIN -p udp --dport 53 -j REDIRECT --to-ports "$DNS_PORT"
        "$ipt" -w -t nat -A $NAT_CHAIN -p tcp --dport 53 -j REDIRECT --to-ports "$DNS_PORT"
    fi
    "$ipt" -w -t nat -A $NAT_CHAIN -m addrtype --dst-type LOCAL -j RETURN
    if [ "$fam" = 4 ] || [ "$IPV6" = redirect ]; then
        "$ipt" -w -t nat -A $NAT_CHAIN -p tcp -j REDIRECT --to-ports "$PROXY_PORT"
    fi
    # filter: accept what may pass, drop the rest.
    for u in $(ipt_each_id "$EXEMPT_UIDS"); do
        "$ipt" -w -t filter -A $OUT_CHAIN -m owner --uid-owner "$u" -j ACCEPT
    done
    for g in $(ipt_each_id "$EXEMPT_GIDS"); do
        "$ipt" -w -t filter -A $OUT_CHAIN -m owner --gid-owner "$g" -j ACCEPT
    done
    for a in $(echo "$DENY_LOCAL" | tr ',' ' '); do
        case "$a" in
            *:*) afam=6 ;;
            *) afam=4 ;;
        esac
        if [ "$afam" = "$fam" ]; then
            "$ipt" -w -t filter -A $OUT_CHAIN -d "$a" -j DROP
        fi
    done
    "$ipt" -w -t filter -A $OUT_CHAIN -m conntrack --ctstate DNAT -j ACCEPT
    "$ipt" -w -t filter -A $OUT_CHAIN -m addrtype --dst-type LOCAL -j ACCEPT
    "$ipt" -w -t filter -A $OUT_CHAIN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    "$ipt" -w -t filter -A $OUT_CHAIN -j DROP
    # Hook the chains first in OUTPUT, once.
    for t in nat filter; do
        if [ $t = nat ]; then ch=$NAT_CHAIN; else ch=$OUT_CHAIN; fi
        "$ipt" -w -t $t -C OUTPUT -j $ch 2>/dev/null || "$ipt" -w -t $t -I OUTPUT 1 -j $ch
    done
}

ipt_remove_family() {
    ipt=$1
    command -v "$ipt" >/dev/null 2>&1 || return 0
    for t in nat filter; do
        if [ $t = nat ]; then ch=$NAT_CHAIN; else ch=$OUT_CHAIN; fi
        i=0
        while "$ipt" -w -t $t -C OUTPUT -j $ch 2>/dev/null && [ $i -lt 16 ]; do
            "$ipt" -w -t $t -D OUTPUT -j $ch
            i=$((i + 1))
        done
        "$ipt" -w -t $t -F $ch 2>/dev/null || true
        "$ipt" -w -t $t -X $ch 2>/dev/null || true
    done
}

ipt_install() {
    # Each family's chains are filled before they are hooked into OUTPUT, so a
    # half-installed family never redirects without also dropping.
    ipt_install_family iptables 4
    ipt_install_family ip6tables 6
}

ipt_remove() {
    ipt_remove_family iptables
    ipt_remove_family ip6tables
}

ipt_status() {
    iptables -w -t filter -S $OUT_CHAIN 2>/dev/null || { echo "funnel not installed (iptables chain $OUT_CHAIN missing)" >&2; exit 1; }
    iptables -w -t nat -S $NAT_CHAIN
    ip6tables -w -t filter -S $OUT_CHAIN
    ip6tables -w -t nat -S $NAT_CHAIN
}

# -------------------------------------------------------------------- main --

case "$CMD:$BACKEND" in
    print:*) nft_ruleset ;;
    install:nft) nft_install; echo "$PROG: funnel installed (nft, proxy :$PROXY_PORT, dns :$DNS_PORT, exempt uid $EXEMPT_UIDS${EXEMPT_GIDS:+ gid $EXEMPT_GIDS}, ipv6 $IPV6)" ;;
    install:iptables) ipt_install; echo "$PROG: funnel installed (iptables, proxy :$PROXY_PORT, dns :$DNS_PORT, exempt uid $EXEMPT_UIDS${EXEMPT_GIDS:+ gid $EXEMPT_GIDS}, ipv6 $IPV6)" ;;
    remove:nft) nft_remove; echo "$PROG: funnel removed (nft)" ;;
    remove:iptables) ipt_remove; echo "$PROG: funnel removed (iptables)" ;;
    status:nft) nft_status ;;
    status:iptables) ipt_status ;;
esac
