//! Validate policy files offline: prints every located error
//! (`file:line:col: [rule id] path: message`) and exits non-zero on any.
//!
//! `cargo run -p secureops-policy --example policy_check -- FILE...`

use secureops_policy::policy::Policy;

fn main() {
    let mut failed = false;
    for path in std::env::args().skip(1) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{path}: {e}");
                failed = true;
                continue;
            }
        };
        match Policy::compile(&text) {
            Ok(p) => println!(
                "{path}: ok ({} rules, mode {:?}, default {:?})",
                p.rule_count(),
                p.mode(),
                p.default_action()
            ),
            Err(errs) => {
                failed = true;
                for e in errs {
                    eprintln!("{path}:{e}");
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
