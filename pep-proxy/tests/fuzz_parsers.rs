//! Property tests (fuzzing) of everything that parses client bytes: the
//! request-head parser, CONNECT authorities, absolute URIs and the
//! ClientHello peek. None may panic on any input; truncated or corrupted
//! ClientHellos must never classify as a complete, different hello.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use secureops_proxy::parse::{
    parse_absolute_uri, parse_authority, parse_ipv4_any, parse_request_head,
};
use secureops_proxy::peek::{Peeked, build_client_hello, classify};

fn authority_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9.:\\[\\]%@_-]{0,40}",
        "\\[[0-9a-f:.%]{0,30}\\](:[0-9]{0,6})?",
        "(0x)?[0-9a-f]{1,10}(\\.(0x)?[0-9a-f]{1,4}){0,4}(:[0-9]{1,5})?",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn classify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = classify(&bytes);
    }

    #[test]
    fn tls_prefixed_garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut b = vec![0x16, 0x03, 0x01];
        b.extend_from_slice(&tail);
        let _ = classify(&b);
    }

    #[test]
    fn corrupted_client_hello_never_panics(
        records in 1usize..5,
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        sni in "[a-z]{1,20}\\.test",
    ) {
        let ch = build_client_hello(Some(&sni), true, records);
        // Every strict prefix needs more bytes.
        let n = cut.index(ch.len());
        prop_assert!(matches!(classify(&ch[..n]), Peeked::NeedMore));
        // Random byte flips: any classification but no panic, and a
        // complete hello only ever reports a syntactically valid SNI.
        let mut m = ch.clone();
        for (i, v) in flips {
            let i = i.index(m.len());
            m[i] ^= v;
        }
        if let Peeked::Tls(info) = classify(&m)
            && let Some(s) = info.sni {
                prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(!s.contains([':', '@', '[']));
            }
    }

    #[test]
    fn authorities_never_panic(s in authority_like()) {
        if let Ok(a) = parse_authority(&s, None) {
            prop_assert!(a.port >= 1);
            prop_assert!(!a.host.is_empty());
            prop_assert!(!s.contains('@'));
        }
        let _ = parse_authority(&s, Some(80));
        let _ = parse_absolute_uri(&format!("http://{s}/x"));
        let _ = parse_absolute_uri(&s);
    }

    #[test]
    fn request_heads_never_panic(
        method in "[A-Z]{0,8}",
        target in authority_like(),
        junk in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut b = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
        b.extend_from_slice(&junk);
        let _ = parse_request_head(&b);
        let _ = parse_request_head(&junk);
    }

    #[test]
    fn every_decimal_ipv4_is_an_ip_literal(v in any::<u32>(), port in 1u16..) {
        let ip = Ipv4Addr::from(v);
        prop_assert_eq!(parse_ipv4_any(&v.to_string()), Some(ip));
        prop_assert_eq!(parse_ipv4_any(&format!("{v:#x}")), Some(ip));
        let a = parse_authority(&format!("{ip}:{port}"), None).unwrap();
        prop_assert_eq!(a.ip_literal, Some(ip.into()));
    }
}
