//! Starting and supervising the SecureOps services as child processes: the
//! engine behind `secureops dev` and `secureops run`.
//!
//! Each child prints `LISTENING <name> <addr>` lines on stdout; we wait for
//! the ones we need, forward its logs to our stderr with a `[name]` prefix,
//! and watch it: a child that dies is reported and takes the stack down
//! (a half-running firewall is worse than a stopped one).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The default policy, also shipped as `deploy/policies/default.yaml`.
pub const DEFAULT_POLICY: &str = include_str!("../../deploy/policies/default.yaml");

#[derive(Debug, Args, Clone)]
pub struct DevArgs {
    /// Data directory (policies, audit log, keys, spools, tokens).
    #[arg(long, env = "SECUREOPS_DATA_DIR", default_value = ".secureops")]
    pub data_dir: PathBuf,
    /// Policy to bootstrap the PDP with (default: the embedded policy).
    #[arg(long, env = "SECUREOPS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Workload id the PEPs enforce for.
    #[arg(long, env = "SECUREOPS_WORKLOAD", default_value = "dev")]
    pub workload: String,
    /// Upstream DNS server of the sinkhole (default: first nameserver of
    /// /etc/resolv.conf).
    #[arg(long, env = "SECUREOPS_UPSTREAM_DNS")]
    pub upstream_dns: Option<SocketAddr>,
    /// Do not start the context sensor even where fanotify is available.
    #[arg(long)]
    pub no_sensor: bool,
    /// Use ephemeral ports instead of the documented defaults.
    #[arg(long)]
    pub ephemeral_ports: bool,
    /// Directory holding the service binaries (default: next to `secureops`).
    #[arg(long, env = "SECUREOPS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Resolve HOST to IP in the proxy (repeatable; HOST=IP), for air-gapped
    /// hosts and local test services.
    #[arg(long = "resolve")]
    pub resolve: Vec<String>,
    /// Hide the services' logs.
    #[arg(long)]
    pub quiet: bool,
}

/// Where the stack's listeners ended up.
#[derive(Debug, Clone, Default)]
pub struct StackAddrs {
    pub pdp: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub audit: Option<SocketAddr>,
    pub proxy: Option<SocketAddr>,
    pub transparent: Option<SocketAddr>,
    pub dns: Option<SocketAddr>,
}

/// Options for one stack (dev or run).
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub data_dir: PathBuf,
    pub policy_file: PathBuf,
    pub workload: String,
    pub upstream_dns: SocketAddr,
    pub sensor: bool,
    pub bin_dir: PathBuf,
    /// Listen addresses (port 0 = ephemeral).
    pub pdp_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub audit_listen: SocketAddr,
    pub proxy_listen: SocketAddr,
    pub transparent_listen: Option<SocketAddr>,
    pub dns_listen: SocketAddr,
    /// Extra `--resolve HOST=IP` for the proxy (air-gapped hosts, tests).
    pub resolve: Vec<String>,
    /// Print the children's logs.
    pub show_logs: bool,
}

struct Running {
    name: &'static str,
    child: Child,
}

/// A running stack. Dropping it kills the children; [`Stack::shutdown`]
/// stops them gracefully.
pub struct Stack {
    children: Vec<Running>,
    pub addrs: StackAddrs,
    pub admin_token_file: PathBuf,
    pub audit_pubkey: PathBuf,
    pub audit_dir: PathBuf,
    exited: mpsc::UnboundedReceiver<(&'static str, String)>,
    exit_tx: mpsc::UnboundedSender<(&'static str, String)>,
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Write `contents` to `path` with mode 0600 (tokens, keys).
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// First `nameserver` of /etc/resolv.conf (port 53), else 127.0.0.53.
pub fn system_upstream_dns() -> SocketAddr {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("nameserver"))
                    .then(|| it.next())
                    .flatten()
                    .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            })
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 53], 53)))
}

/// Directory of the service binaries: next to the running `secureops`.
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Whether fanotify permission events can be used here.
pub fn sensor_possible() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    root && Path::new("/proc/sys/fs/fanotify").exists()
}

impl Stack {
    /// Start PDP, audit, proxy, sinkhole (and sensor) and wait until every
    /// listener is announced.
    pub async fn start(cfg: &StackConfig) -> Result<Stack> {
        let d = &cfg.data_dir;
        for sub in ["pdp", "audit", "spool/proxy", "spool/dns", "tokens"] {
            std::fs::create_dir_all(d.join(sub))
                .with_context(|| format!("creating {}", d.join(sub).display()))?;
        }
        // Per-source audit credentials: the PEPs may append only as
        // themselves; the workload never sees these files (mode 0600).
        let tokens_file = d.join("audit/tokens");
        let mut tokens: HashMap<&str, String> = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&tokens_file) {
            for l in text.lines() {
                if let Some((src, tok)) = l.split_once(' ') {
                    match src {
                        "proxy" => tokens.insert("proxy", tok.trim().to_string()),
                        "dns" => tokens.insert("dns", tok.trim().to_string()),
                        _ => None,
                    };
                }
            }
        }
        for src in ["proxy", "dns"] {
            tokens.entry(src).or_insert_with(random_token);
        }
        let mut lines = String::new();
        for src in ["proxy", "dns"] {
            let tok = &tokens[src];
            lines.push_str(&format!("{src} {tok}\n"));
            write_private(&d.join(format!("tokens/{src}.token")), tok)?;
        }
        write_private(&tokens_file, &lines)?;

        let (exit_tx, exited) = mpsc::unbounded_channel();
        let mut stack = Stack {
            children: Vec::new(),
            addrs: StackAddrs::default(),
            admin_token_file: d.join("pdp/admin.token"),
            audit_pubkey: d.join("audit/audit.key.pub"),
            audit_dir: d.join("audit"),
            exited,
            exit_tx,
        };
        let s = |p: &Path| p.display().to_string();
        // The admin credential: generated once (0600), shown to the operator,
        // never given to the workload.
        if !stack.admin_token_file.exists() {
            write_private(&stack.admin_token_file, &random_token())?;
        }

        let pdp = stack
            .spawn(
                cfg,
                "pdp",
                "secureops-pdp",
                vec![
                    "--listen".into(),
                    cfg.pdp_listen.to_string(),
                    "--admin-listen".into(),
                    cfg.admin_listen.to_string(),
                    "--data-dir".into(),
                    s(&d.join("pdp")),
                    "--policy".into(),
                    s(&cfg.policy_file),
                    "--admin-token-file".into(),
                    s(&stack.admin_token_file),
                    "--metrics-listen".into(),
                    "127.0.0.1:0".into(),
                ],
                &["grpc", "admin"],
            )
            .await?;
        stack.addrs.pdp = pdp.get("grpc").copied();
        stack.addrs.admin = pdp.get("admin").copied();
        let pdp_url = format!(
            "http://{}",
            stack
                .addrs
                .pdp
                .ok_or_else(|| anyhow!("pdp gave no grpc address"))?
        );

        let audit = stack
            .spawn(
                cfg,
                "audit",
                "secureops-audit",
                vec![
                    "serve".into(),
                    "--listen".into(),
                    cfg.audit_listen.to_string(),
                    "--data-dir".into(),
                    s(&d.join("audit")),
                    "--tokens-file".into(),
                    s(&tokens_file),
                    "--metrics-listen".into(),
                    "127.0.0.1:0".into(),
                ],
                &["grpc"],
            )
            .await?;
        stack.addrs.audit = audit.get("grpc").copied();
        let audit_url = format!(
            "http://{}",
            stack
                .addrs
                .audit
                .ok_or_else(|| anyhow!("audit gave no address"))?
        );

        let mut proxy_args = vec![
            "--listen".into(),
            cfg.proxy_listen.to_string(),
            "--pdp".into(),
            pdp_url.clone(),
            "--audit".into(),
            audit_url.clone(),
            "--audit-token-file".into(),
            s(&d.join("tokens/proxy.token")),
            "--pep-id".into(),
            "proxy".into(),
            "--spool-dir".into(),
            s(&d.join("spool/proxy")),
            "--workload".into(),
            cfg.workload.clone(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        let mut expect = vec!["proxy"];
        if let Some(t) = cfg.transparent_listen {
            proxy_args.push("--transparent-listen".into());
            proxy_args.push(t.to_string());
            expect.push("transparent");
        }
        for r in &cfg.resolve {
            proxy_args.push("--resolve".into());
            proxy_args.push(r.clone());
        }
        let proxy = stack
            .spawn(cfg, "proxy", "secureops-proxy", proxy_args, &expect)
            .await?;
        stack.addrs.proxy = proxy.get("proxy").copied();
        stack.addrs.transparent = proxy.get("transparent").copied();

        let dns = stack
            .spawn(
                cfg,
                "dns",
                "secureops-dns",
                vec![
                    "--listen".into(),
                    cfg.dns_listen.to_string(),
                    "--upstream".into(),
                    cfg.upstream_dns.to_string(),
                    "--pdp".into(),
                    pdp_url.clone(),
                    "--audit".into(),
                    audit_url,
                    "--audit-token-file".into(),
                    s(&d.join("tokens/dns.token")),
                    "--pep-id".into(),
                    "dns".into(),
                    "--spool-dir".into(),
                    s(&d.join("spool/dns")),
                    "--workload".into(),
                    cfg.workload.clone(),
                    "--metrics-listen".into(),
                    "127.0.0.1:0".into(),
                ],
                &["dns"],
            )
            .await?;
        stack.addrs.dns = dns.get("dns").copied();

        if cfg.sensor {
            stack
                .spawn(
                    cfg,
                    "sensor",
                    "secureops-sensor",
                    vec![
                        "--pdp".into(),
                        pdp_url,
                        "--workload".into(),
                        cfg.workload.clone(),
                        "--metrics-listen".into(),
                        "127.0.0.1:0".into(),
                    ],
                    &["metrics"],
                )
                .await?;
        }
        Ok(stack)
    }

    async fn spawn(
        &mut self,
        cfg: &StackConfig,
        name: &'static str,
        bin: &str,
        args: Vec<String>,
        expect: &[&str],
    ) -> Result<HashMap<String, SocketAddr>> {
        let path = cfg.bin_dir.join(bin);
        if !path.exists() {
            bail!(
                "{} not found (build the workspace: `cargo build --release --bins`, or pass --bin-dir)",
                path.display()
            );
        }
        let mut child = Command::new(&path)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{name}: no stderr"))?;
        let show = cfg.show_logs;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if show {
                    eprintln!("[{name}] {l}");
                }
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, SocketAddr)>();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let mut it = l.split_whitespace();
                if it.next() == Some("LISTENING")
                    && let (Some(n), Some(a)) = (it.next(), it.next())
                    && let Ok(addr) = a.parse()
                {
                    let _ = tx.send((n.to_string(), addr));
                } else if show {
                    eprintln!("[{name}] {l}");
                }
            }
        });
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !expect.iter().all(|e| got.contains_key(*e)) {
            tokio::select! {
                m = rx.recv() => match m {
                    Some((n, a)) => { got.insert(n, a); }
                    None => {
                        let st = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                        bail!("{name} ({bin}) exited ({st}) before it was ready; see its log above");
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    bail!("{name} ({bin}) did not become ready within 30 s");
                }
            }
        }
        // Keep draining later LISTENING lines (e.g. metrics) in the background.
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let pid = child.id();
        let tx = self.exit_tx.clone();
        self.children.push(Running { name, child });
        tracing::debug!(name, ?pid, "started");
        let _ = tx; // exits are observed in `wait_any_exit`
        Ok(got)
    }

    /// Resolve when any child exits: returns (name, status).
    pub async fn wait_any_exit(&mut self) -> (&'static str, String) {
        loop {
            for r in &mut self.children {
                if let Ok(Some(st)) = r.child.try_wait() {
                    return (r.name, st.to_string());
                }
            }
            if let Ok(m) = self.exited.try_recv() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM every child (PEPs first, PDP last), wait up to `grace`, then
    /// SIGKILL what is left.
    pub async fn shutdown(mut self, grace: Duration) {
        for r in self.children.iter().rev() {
            if let Some(pid) = r.child.id().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) on a child we spawned and still own.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for r in self.children.iter_mut().rev() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, r.child.wait()).await.is_err() {
                let _ = r.child.kill().await;
            }
        }
    }
}

/// `secureops dev`.
pub async fn dev(a: DevArgs) -> Result<u8> {
    let _ = secureops_pep::telemetry::init_tracing(
        "secureops",
        secureops_pep::telemetry::LogFormat::Text,
    );
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&a.data_dir)?;
    let policy_file = match &a.policy {
        Some(p) => p.clone(),
        None => {
            let p = data_dir.join("default-policy.yaml");
            std::fs::write(&p, DEFAULT_POLICY)
                .with_context(|| format!("writing {}", p.display()))?;
            p
        }
    };
    let port = |p: u16| if a.ephemeral_ports { 0 } else { p };
    let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], port(p)));
    let sensor = !a.no_sensor && sensor_possible();
    let cfg = StackConfig {
        data_dir: data_dir.clone(),
        policy_file,
        workload: a.workload.clone(),
        upstream_dns: a.upstream_dns.unwrap_or_else(system_upstream_dns),
        sensor,
        bin_dir: a.bin_dir.clone().unwrap_or_else(default_bin_dir),
        pdp_listen: lo(7400),
        admin_listen: lo(7401),
        audit_listen: lo(7410),
        proxy_listen: lo(7480),
        transparent_listen: Some(lo(7481)),
        dns_listen: lo(7453),
        resolve: a.resolve.clone(),
        show_logs: !a.quiet,
    };
    let mut stack = Stack::start(&cfg).await?;
    let ad = &stack.addrs;
    // Machine-readable addresses for scripts and tests.
    for (name, addr) in [
        ("pdp", ad.pdp),
        ("admin", ad.admin),
        ("audit", ad.audit),
        ("proxy", ad.proxy),
        ("transparent", ad.transparent),
        ("dns", ad.dns),
    ] {
        if let Some(addr) = addr {
            secureops_pep::telemetry::announce_listener(name, addr);
        }
    }
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!();
    println!(
        "SecureOps dev stack is up (workload {:?}, data dir {})",
        a.workload,
        data_dir.display()
    );
    println!(
        "  PDP            {}   admin {}",
        show(ad.pdp),
        show(ad.admin)
    );
    println!("  audit          {}", show(ad.audit));
    println!(
        "  proxy          {}   transparent {}",
        show(ad.proxy),
        show(ad.transparent)
    );
    println!("  DNS sinkhole   {} (udp+tcp)", show(ad.dns));
    println!(
        "  context sensor {}",
        if sensor {
            "running (fanotify)"
        } else {
            "off (needs root + fanotify, or --no-sensor given)"
        }
    );
    println!("  admin token    {}", stack.admin_token_file.display());
    println!("  audit pubkey   {}", stack.audit_pubkey.display());
    println!();
    println!("Send a shell's traffic through it:");
    if let Some(p) = ad.proxy {
        println!(
            "  export HTTPS_PROXY=http://{p} HTTP_PROXY=http://{p} https_proxy=http://{p} http_proxy=http://{p} NO_PROXY="
        );
    }
    println!(
        "  export SECUREOPS_ADMIN_TOKEN_FILE={}",
        stack.admin_token_file.display()
    );
    if let (Some(p), Some(adm)) = (ad.pdp, ad.admin) {
        println!("  export SECUREOPS_PDP=http://{p} SECUREOPS_ADMIN=http://{adm}");
    }
    if let Some(au) = ad.audit {
        println!("  export SECUREOPS_AUDIT=http://{au}");
    }
    println!(
        "Verify the log any time: secureops audit verify --dir {} --pubkey {}",
        stack.audit_dir.display(),
        stack.audit_pubkey.display()
    );
    println!("Ctrl-C stops the stack.");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let code = tokio::select! {
        _ = tokio::signal::ctrl_c() => { eprintln!("\nstopping (Ctrl-C)"); 0 }
        _ = sigterm.recv() => { eprintln!("stopping (SIGTERM)"); 0 }
        (name, status) = stack.wait_any_exit() => {
            eprintln!("error: {name} exited unexpectedly ({status}); stopping the stack");
            1
        }
    };
    stack.shutdown(Duration::from_secs(5)).await;
    Ok(code)
}
