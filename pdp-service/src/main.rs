//! `secureops-pdp`: the SecureOps Policy Decision Point (DESIGN §3).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    secureops_policy::app::main_with(secureops_policy::app::Args::parse())
}
