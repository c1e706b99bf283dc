//! `secureops-pdp`: the SecureOps Policy Decision Point (DESIGN §3).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    secureops_policy::app::run(secureops_policy::app::Args::parse()).await
}
