//! Special-purpose IP classification (IANA special-purpose registries),
//! including IPv4 addresses embedded in IPv6 (mapped, compatible, NAT64,
//! 6to4, Teredo).
//!
//! One classifier for the PDP and the PEPs: the PDP's special-IP and
//! DNS-rebinding rules (DESIGN §4) use it, and the proxy uses it to know
//! when a name's DNS answer can change the name's decision at all (only an
//! answer with a special-purpose address can).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How an IPv4 address is embedded in an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Embedding {
    /// `::ffff:0:0/96` (RFC 4291 §2.5.5.2).
    Ipv4Mapped,
    /// `::/96` IPv4-compatible (deprecated, RFC 4291 §2.5.5.1).
    Ipv4Compatible,
    /// `64:ff9b::/96` well-known NAT64 prefix (RFC 6052).
    Nat64,
    /// `64:ff9b:1::/48` local-use NAT64 prefix (RFC 8215).
    Nat64Local,
    /// `2002::/16` 6to4 (RFC 3056).
    SixToFour,
    /// `2001::/32` Teredo (RFC 4380); the client address is XOR-obfuscated.
    Teredo,
}

/// A special-purpose address range. Every variant is denied as a
/// destination unless an allow rule's `cidr` contains the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialRange {
    /// `0.0.0.0/8` "this network" (includes `0.0.0.0`), `::/128`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918: `10/8`, `172.16/12`, `192.168/16`.
    Private,
    /// `100.64.0.0/10` carrier-grade NAT (RFC 6598).
    SharedCgnat,
    /// `169.254.0.0/16` (except the metadata address), `fe80::/10`.
    LinkLocal,
    /// `169.254.169.254`, `fd00:ec2::254`: cloud instance metadata services.
    CloudMetadata,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `240.0.0.0/4` and other reserved / deprecated ranges
    /// (`192.88.99.0/24`, `fec0::/10` site-local, `100::/64` discard-only,
    /// the rest of `2001::/23` IETF protocol assignments).
    Reserved,
    /// `192.0.0.0/24` IETF protocol assignments.
    IetfProtocol,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// `fc00::/7` unique local.
    UniqueLocal,
    /// An IPv4 address embedded in IPv6. The whole embedding ranges are
    /// special (a PEP should dial IPv4 directly); `v4` is the embedded
    /// address when it can be extracted and `inner` its own class.
    Embedded {
        /// Which embedding.
        kind: Embedding,
        /// The embedded IPv4 address.
        v4: Ipv4Addr,
        /// Classification of the embedded address itself.
        inner: Option<EmbeddedClass>,
    },
}

/// The class of an embedded IPv4 address (a non-recursive copy of the IPv4
/// variants of [`SpecialRange`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EmbeddedClass(pub V4Class);

/// IPv4 special classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum V4Class {
    /// See [`SpecialRange::Unspecified`].
    Unspecified,
    /// See [`SpecialRange::Loopback`].
    Loopback,
    /// See [`SpecialRange::Private`].
    Private,
    /// See [`SpecialRange::SharedCgnat`].
    SharedCgnat,
    /// See [`SpecialRange::LinkLocal`].
    LinkLocal,
    /// See [`SpecialRange::CloudMetadata`].
    CloudMetadata,
    /// See [`SpecialRange::Multicast`].
    Multicast,
    /// See [`SpecialRange::Broadcast`].
    Broadcast,
    /// See [`SpecialRange::Reserved`].
    Reserved,
    /// See [`SpecialRange::IetfProtocol`].
    IetfProtocol,
    /// See [`SpecialRange::Documentation`].
    Documentation,
    /// See [`SpecialRange::Benchmarking`].
    Benchmarking,
}

impl From<V4Class> for SpecialRange {
    fn from(c: V4Class) -> Self {
        match c {
            V4Class::Unspecified => SpecialRange::Unspecified,
            V4Class::Loopback => SpecialRange::Loopback,
            V4Class::Private => SpecialRange::Private,
            V4Class::SharedCgnat => SpecialRange::SharedCgnat,
            V4Class::LinkLocal => SpecialRange::LinkLocal,
            V4Class::CloudMetadata => SpecialRange::CloudMetadata,
            V4Class::Multicast => SpecialRange::Multicast,
            V4Class::Broadcast => SpecialRange::Broadcast,
            V4Class::Reserved => SpecialRange::Reserved,
            V4Class::IetfProtocol => SpecialRange::IetfProtocol,
            V4Class::Documentation => SpecialRange::Documentation,
            V4Class::Benchmarking => SpecialRange::Benchmarking,
        }
    }
}

impl fmt::Display for SpecialRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecialRange::Embedded { kind, v4, inner } => {
                write!(f, "{kind:?}({v4}")?;
                if let Some(EmbeddedClass(c)) = inner {
                    write!(f, ", {c:?}")?;
                }
                f.write_str(")")
            }
            other => write!(f, "{other:?}"),
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<V4Class> {
    let o = ip.octets();
    let v = u32::from(ip);
    let in_net = |net: u32, len: u32| (v ^ net) >> (32 - len) == 0;
    Some(match o {
        [0, ..] => V4Class::Unspecified,
        [10, ..] => V4Class::Private,
        [127, ..] => V4Class::Loopback,
        [169, 254, 169, 254] => V4Class::CloudMetadata,
        [169, 254, ..] => V4Class::LinkLocal,
        [192, 168, ..] => V4Class::Private,
        [192, 0, 0, _] => V4Class::IetfProtocol,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => V4Class::Documentation,
        [192, 88, 99, _] => V4Class::Reserved,
        [255, 255, 255, 255] => V4Class::Broadcast,
        _ if in_net(0xac10_0000, 12) => V4Class::Private, // 172.16/12
        _ if in_net(0x6440_0000, 10) => V4Class::SharedCgnat, // 100.64/10
        _ if in_net(0xc612_0000, 15) => V4Class::Benchmarking, // 198.18/15
        _ if in_net(0xe000_0000, 4) => V4Class::Multicast, // 224/4
        _ if in_net(0xf000_0000, 4) => V4Class::Reserved, // 240/4
        _ => return None,
    })
}

/// The IPv4 address embedded in `ip`, if `ip` is in one of the embedding
/// ranges.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<(Embedding, Ipv4Addr)> {
    let b = ip.octets();
    let s = ip.segments();
    let tail = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return Some((Embedding::Ipv4Mapped, tail));
    }
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        // `::` and `::1` are their own classes.
        return Some((Embedding::Ipv4Compatible, tail));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some((Embedding::Nat64, tail));
    }
    if s[..3] == [0x64, 0xff9b, 1] {
        // RFC 6052 /48 layout: bits 48..64 and 72..88 (octet 8 is "u").
        return Some((
            Embedding::Nat64Local,
            Ipv4Addr::new(b[6], b[7], b[9], b[10]),
        ));
    }
    if s[0] == 0x2002 {
        return Some((Embedding::SixToFour, Ipv4Addr::new(b[2], b[3], b[4], b[5])));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        let client = !u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        return Some((Embedding::Teredo, Ipv4Addr::from(client)));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<SpecialRange> {
    if let Some((kind, v4)) = embedded_v4(ip) {
        return Some(SpecialRange::Embedded {
            kind,
            v4,
            inner: classify_v4(v4).map(EmbeddedClass),
        });
    }
    let s = ip.segments();
    let v = u128::from(ip);
    let in_net = |net: u128, len: u32| (v ^ net) >> (128 - len) == 0;
    Some(if v == 0 {
        SpecialRange::Unspecified
    } else if v == 1 {
        SpecialRange::Loopback
    } else if s[0] == 0xfd00 && s[1] == 0x0ec2 && s[2..7] == [0; 5] && s[7] == 0x254 {
        SpecialRange::CloudMetadata
    } else if in_net(0xfc00 << 112, 7) {
        SpecialRange::UniqueLocal
    } else if in_net(0xfe80 << 112, 10) {
        SpecialRange::LinkLocal
    } else if in_net(0xfec0 << 112, 10) {
        SpecialRange::Reserved
    } else if s[0] >> 8 == 0xff {
        SpecialRange::Multicast
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        SpecialRange::Documentation
    } else if s[0] == 0x2001 && s[1] == 2 && s[2] == 0 {
        SpecialRange::Benchmarking
    } else if in_net(0x2001 << 112, 23) || in_net(0x0100 << 112, 64) {
        SpecialRange::Reserved
    } else if in_net(0, 8) {
        // ::/8 outside the cases above (reserved by IETF).
        SpecialRange::Reserved
    } else {
        return None;
    })
}

/// Classify `ip` as special-purpose; `None` for ordinary global unicast.
pub fn classify_ip(ip: IpAddr) -> Option<SpecialRange> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4).map(SpecialRange::from),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The DNS-rebinding rule (DESIGN §4) over the addresses of one named
/// destination: some address is special-purpose and `allowed` covers
/// neither it nor its canonical form (an IPv4-mapped address counts as its
/// IPv4 address). The PDP passes its `resolved_ip_allow`, the standalone
/// `AllowlistPdp` its `--resolved-ip-allow`, and the proxy nothing (to ask
/// whether an answer could trip the guard at all).
pub fn rebinding_violation(
    ips: impl IntoIterator<Item = IpAddr>,
    allowed: impl Fn(IpAddr) -> bool,
) -> bool {
    ips.into_iter()
        .any(|ip| classify_ip(ip).is_some() && !allowed(ip) && !allowed(ip.to_canonical()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Option<SpecialRange> {
        classify_ip(s.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges() {
        use SpecialRange::*;
        for (ip, want) in [
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("169.254.1.1", LinkLocal),
            ("169.254.169.254", CloudMetadata),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.2.1", Documentation),
            ("198.18.0.1", Benchmarking),
            ("192.0.0.8", IetfProtocol),
        ] {
            assert_eq!(c(ip), Some(want), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "1.1.1.1",
        ] {
            assert_eq!(c(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embeddings() {
        use SpecialRange::*;
        assert_eq!(c("::1"), Some(Loopback));
        assert_eq!(c("::"), Some(Unspecified));
        assert_eq!(c("fc00::1"), Some(UniqueLocal));
        assert_eq!(c("fd12:3456::1"), Some(UniqueLocal));
        assert_eq!(c("fd00:ec2::254"), Some(CloudMetadata));
        assert_eq!(c("fe80::1"), Some(LinkLocal));
        assert_eq!(c("febf::1"), Some(LinkLocal));
        assert_eq!(c("ff02::1"), Some(Multicast));
        assert_eq!(c("2001:db8::1"), Some(Documentation));
        assert_eq!(c("2606:4700::1111"), None);
        assert_eq!(c("2a00:1450:4001::1"), None);

        let emb = |s: &str| match c(s) {
            Some(Embedded { kind, v4, inner }) => (kind, v4, inner.map(|e| e.0)),
            other => panic!("{s}: {other:?}"),
        };
        let lo = Ipv4Addr::new(127, 0, 0, 1);
        let md = Ipv4Addr::new(169, 254, 169, 254);
        assert_eq!(
            emb("::ffff:127.0.0.1"),
            (Embedding::Ipv4Mapped, lo, Some(V4Class::Loopback))
        );
        assert_eq!(
            emb("::ffff:8.8.8.8"),
            (Embedding::Ipv4Mapped, Ipv4Addr::new(8, 8, 8, 8), None)
        );
        assert_eq!(
            emb("::127.0.0.1"),
            (Embedding::Ipv4Compatible, lo, Some(V4Class::Loopback))
        );
        assert_eq!(
            emb("64:ff9b::169.254.169.254"),
            (Embedding::Nat64, md, Some(V4Class::CloudMetadata))
        );
        // RFC 6052 /48 layout: octets 6,7 then (u octet 8) 9,10.
        assert_eq!(
            emb("64:ff9b:1:a00:0:100::"),
            (
                Embedding::Nat64Local,
                Ipv4Addr::new(10, 0, 0, 1),
                Some(V4Class::Private)
            )
        );
        assert_eq!(
            emb("2002:7f00:1::1"),
            (Embedding::SixToFour, lo, Some(V4Class::Loopback))
        );
        // Teredo: server 65.54.227.120, client 127.0.0.1 obfuscated as 80ff:fffe.
        assert_eq!(
            emb("2001:0:4136:e378:8000:63bf:80ff:fffe"),
            (Embedding::Teredo, lo, Some(V4Class::Loopback))
        );
    }
}
