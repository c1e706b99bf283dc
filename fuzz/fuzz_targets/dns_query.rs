//! The sinkhole's hand-written DNS query parser and the answers built from
//! what it accepts: any datagram parses or is refused, never a panic, and an
//! accepted query yields a well-formed answer header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use secureops_dns::SinkholeAnswer;
use secureops_dns::wire::{parse_query, sinkhole_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = parse_query(data) {
        for answer in [
            SinkholeAnswer::NxDomain,
            SinkholeAnswer::Refused,
            SinkholeAnswer::NoData,
            SinkholeAnswer::Zero,
        ] {
            let mut out = Vec::new();
            sinkhole_response(&mut out, &q, answer, 60, 1232);
            assert!(out.len() >= 12, "answer shorter than a DNS header");
            assert_eq!(out[..2], data[..2], "answer id differs from the query id");
        }
    }
});
