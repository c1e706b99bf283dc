//! The explicit-mode request head, CONNECT authority and absolute-URI
//! parsers: any bytes give a result or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use secureops_proxy::parse::{parse_absolute_uri, parse_authority, parse_request_head};

fuzz_target!(|data: &[u8]| {
    let _ = parse_request_head(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(a) = parse_authority(s, Some(443)) {
            // A parsed authority always has a usable port.
            assert!(a.port != 0);
        }
        let _ = parse_authority(s, None);
        let _ = parse_absolute_uri(s);
    }
});
