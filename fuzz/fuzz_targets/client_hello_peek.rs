//! The transparent-mode peek (TLS ClientHello SNI / HTTP Host / neither)
//! on any prefix of any bytes: a classification, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use secureops_proxy::peek::classify;

fuzz_target!(|data: &[u8]| {
    // Every prefix, as the peek sees the bytes arrive.
    for end in [data.len() / 3, data.len() / 2, data.len()] {
        let _ = classify(&data[..end]);
    }
});
