//! `secureops`: the operator CLI.
//!
//! * `secureops dev` — the whole stack on loopback (PDP, audit, proxy,
//!   sinkhole, sensor where the OS allows) with an embedded default policy.
//! * `secureops run -- CMD` — run a command with its egress funnelled.
//! * `secureops policy|escalations|audit|check` — operate a running stack.
//!
//! Exit codes: 0 success; 1 operational error (unreachable service, I/O);
//! 2 usage error (clap); 3 a policy was refused / a check denied / a log did
//! not verify; `run` propagates CMD's exit code.

mod admin;
mod audit;
mod output;
mod run;
mod stack;
mod userns;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// SecureOps: the egress firewall for AI agents.
#[derive(Debug, Parser)]
#[command(name = "secureops", version, about, long_about = None)]
struct Cli {
    /// Machine-readable JSON output instead of tables.
    #[arg(long, global = true, env = "SECUREOPS_JSON")]
    json: bool,
    #[command(flatten)]
    endpoints: Endpoints,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the running services are.
#[derive(Debug, Args, Clone)]
pub struct Endpoints {
    /// PDP decision endpoint.
    #[arg(
        long,
        global = true,
        env = "SECUREOPS_PDP",
        default_value = "http://127.0.0.1:7400"
    )]
    pub pdp: String,
    /// PDP admin endpoint.
    #[arg(
        long,
        global = true,
        env = "SECUREOPS_ADMIN",
        default_value = "http://127.0.0.1:7401"
    )]
    pub admin: String,
    /// File holding the admin bearer token.
    #[arg(
        long,
        global = true,
        env = "SECUREOPS_ADMIN_TOKEN_FILE",
        default_value = ".secureops/pdp/admin.token"
    )]
    pub admin_token_file: PathBuf,
    /// Audit service endpoint.
    #[arg(
        long,
        global = true,
        env = "SECUREOPS_AUDIT",
        default_value = "http://127.0.0.1:7410"
    )]
    pub audit: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the whole stack on loopback (Ctrl-C stops it).
    Dev(stack::DevArgs),
    /// Run a command with its egress funnelled through SecureOps.
    Run(run::RunArgs),
    /// Validate, push, inspect and test policies.
    #[command(subcommand)]
    Policy(admin::PolicyCmd),
    /// List and resolve escalations.
    #[command(subcommand)]
    Escalations(admin::EscalationCmd),
    /// Verify, tail and prove the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Ask the PDP what it would decide for HOST[:PORT].
    Check(admin::CheckArgs),
    /// Internal: the inside of `run`'s rootless namespace.
    #[command(name = "__ns-shim", hide = true)]
    NsShim(userns::ShimArgs),
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let out = output::Output { json: cli.json };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev(a) => stack::dev(a).await,
            Cmd::Run(a) => run::run(a, &out).await,
            Cmd::Policy(c) => admin::policy(c, &cli.endpoints, &out).await,
            Cmd::Escalations(c) => admin::escalations(c, &cli.endpoints, &out).await,
            Cmd::Audit(c) => audit::audit(c, &cli.endpoints, &out).await,
            Cmd::Check(a) => admin::check(a, &cli.endpoints, &out).await,
            Cmd::NsShim(a) => userns::shim(a).await,
            Cmd::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "secureops",
                    &mut std::io::stdout(),
                );
                Ok(0)
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}

/// One line for an error; gRPC statuses as `<context>: <code>: <message>`
/// (tonic's own Display is a sentence that hides the code).
fn describe(e: &anyhow::Error) -> String {
    if let Some(st) = e.chain().find_map(|c| c.downcast_ref::<tonic::Status>()) {
        let code = format!("{:?}", st.code()).to_lowercase();
        let hint = match st.code() {
            tonic::Code::Unauthenticated => {
                " (check --admin-token-file / SECUREOPS_ADMIN_TOKEN_FILE)"
            }
            tonic::Code::Unavailable => " (is the service running? see --pdp / --admin / --audit)",
            _ => "",
        };
        return format!("{e}: {code}: {}{hint}", st.message());
    }
    format!("{e:#}")
}
