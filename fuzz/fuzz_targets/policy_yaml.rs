//! The policy compiler on any text: a policy or located errors, never a
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use secureops_policy::policy::Policy;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(errs) = Policy::compile(s) {
            assert!(!errs.is_empty(), "refused without an error");
        }
    }
});
