//! Shared support for SecureOps integration tests (hickory-dns style): start
//! the real binaries on loopback, learn their addresses from the
//! `LISTENING <name> <addr>` lines they print, create throw-away network
//! namespaces, and mint TLS certificates.
//!
//! Everything here cleans up on drop, including on panic, so a failing test
//! never leaves a process or a namespace behind.

pub mod dns;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Print why a test could not run and return from it. Never a silent pass.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        eprintln!("SKIPPED: {}", format!($($arg)*));
        return;
    }};
}

/// The workspace root (where the top-level Cargo.toml lives).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// Path of a workspace binary in the current profile's target dir
/// (`SECUREOPS_BIN_DIR` overrides). Build it first (`cargo build --bins`):
/// `scripts/test.sh` does.
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("SECUREOPS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("debug").join(name)
}

/// Command-line arguments for a `secureops-pdp` on loopback: gRPC, admin
/// and metrics listeners on ephemeral ports (the test reads them back from
/// the `LISTENING` lines), state under a directory of the test's own.
///
/// ```no_run
/// # use secureops_test_support::{PdpArgs, Service, bin_path};
/// # let dir = std::path::Path::new("/tmp/x");
/// let pdp = Service::spawn(
///     bin_path("secureops-pdp"),
///     PdpArgs::new(dir.join("pdp")).policy(dir.join("policy.yaml")).build(),
///     &["grpc"],
/// );
/// ```
#[derive(Debug, Clone)]
pub struct PdpArgs {
    listen: String,
    data_dir: PathBuf,
    policy: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    extra: Vec<String>,
}

impl PdpArgs {
    /// Every listener on `127.0.0.1:0`, state in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PdpArgs {
            listen: "127.0.0.1:0".into(),
            data_dir: data_dir.into(),
            policy: None,
            admin_token_file: None,
            extra: Vec::new(),
        }
    }

    /// The gRPC listener's address (to restart a PDP on the port it had).
    pub fn listen(mut self, addr: impl ToString) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// `--policy`: the bootstrap policy file.
    pub fn policy(mut self, path: impl Into<PathBuf>) -> Self {
        self.policy = Some(path.into());
        self
    }

    /// `--admin-token-file` (without it the PDP generates one in its data
    /// directory).
    pub fn admin_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.admin_token_file = Some(path.into());
        self
    }

    /// Any further flag or value, in order.
    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    pub fn build(&self) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let mut args = vec![
            "--listen".to_string(),
            self.listen.clone(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            path(&self.data_dir),
        ];
        if let Some(p) = &self.admin_token_file {
            args.extend(["--admin-token-file".into(), path(p)]);
        }
        if let Some(p) = &self.policy {
            args.extend(["--policy".into(), path(p)]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// A running service started from a real binary. Killed on drop.
pub struct Service {
    name: String,
    child: Option<Child>,
    addrs: HashMap<String, SocketAddr>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stdout_rest: Arc<Mutex<Vec<String>>>,
}

/// Why a service failed to start.
#[derive(Debug)]
pub struct SpawnError(pub String);

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SpawnError {}

impl Service {
    /// Start `bin` with `args` and wait (up to 30 s) until it announced every
    /// listener in `expect` (e.g. `["grpc", "admin"]`).
    pub fn spawn<I, S>(bin: impl AsRef<Path>, args: I, expect: &[&str]) -> Result<Self, SpawnError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_with(bin, args, &[], expect)
    }

    /// Like [`Service::spawn`] with extra environment variables.
    pub fn spawn_with<I, S>(
        bin: impl AsRef<Path>,
        args: I,
        env: &[(&str, &str)],
        expect: &[&str],
    ) -> Result<Self, SpawnError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(bin.as_ref());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_command(cmd, expect)
    }

    /// Start a prepared command (e.g. wrapped in `ip netns exec`). Stdout
    /// and stderr are captured by this function.
    pub fn spawn_command(mut cmd: Command, expect: &[&str]) -> Result<Self, SpawnError> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| SpawnError(format!("spawning {name}: {e}")))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        let (tx, rx) = mpsc::channel::<(String, SocketAddr)>();
        let stdout_rest = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let rest = stdout_rest.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut parts = line.split_whitespace();
                    if parts.next() == Some("LISTENING")
                        && let (Some(n), Some(a)) = (parts.next(), parts.next())
                        && let Ok(addr) = a.parse::<SocketAddr>()
                    {
                        let _ = tx.send((n.to_string(), addr));
                        continue;
                    }
                    if let Ok(mut r) = rest.lock() {
                        r.push(line);
                    }
                }
            });
        }
        let mut svc = Service {
            name,
            child: Some(child),
            addrs: HashMap::new(),
            stderr,
            stdout_rest,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !expect.iter().all(|e| svc.addrs.contains_key(*e)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok((n, a)) => {
                    svc.addrs.insert(n, a);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = svc.try_wait() {
                        return Err(SpawnError(format!(
                            "{} exited with {status} before announcing {expect:?}; stderr:\n{}",
                            svc.name,
                            svc.stderr_text()
                        )));
                    }
                    if left.is_zero() {
                        return Err(SpawnError(format!(
                            "{} did not announce {expect:?} within 30 s (got {:?}); stderr:\n{}",
                            svc.name,
                            svc.addrs,
                            svc.stderr_text()
                        )));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(SpawnError(format!(
                        "{} closed stdout before announcing {expect:?}; stderr:\n{}",
                        svc.name,
                        svc.stderr_text()
                    )));
                }
            }
        }
        Ok(svc)
    }

    /// Address announced as `LISTENING <name> <addr>`.
    ///
    /// # Panics
    /// When the service did not announce that listener (a test bug).
    pub fn addr(&self, name: &str) -> SocketAddr {
        match self.addrs.get(name) {
            Some(a) => *a,
            None => panic!(
                "{} announced no listener {name:?}: {:?}",
                self.name, self.addrs
            ),
        }
    }

    /// `http://<addr>` of a listener, for tonic clients.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}", self.addr(name))
    }

    /// Everything the service wrote to stderr so far (its logs).
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default()
    }

    /// Non-LISTENING stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_rest
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// PID of the child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then wait up to `grace` for a graceful exit, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL now (crash simulation) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid we spawned; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Whether this process runs as root (network namespaces, iptables,
/// fanotify need it). Tests print `SKIPPED:` when it returns false.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a command exists on PATH.
pub fn have_command(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace created for one test, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create `so-<tag>-<pid>-<n>`. Err carries the reason to print as
    /// `SKIPPED:` when namespaces are unavailable.
    pub fn create(tag: &str) -> Result<Self, String> {
        if !is_root() {
            return Err("network namespaces need root".into());
        }
        if !have_command("ip") {
            return Err("`ip` (iproute2) is not installed".into());
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("so-{tag}-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip netns add: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = NetNs { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run a command inside the namespace; Err with its stderr on failure.
    pub fn run(&self, argv: &[&str]) -> Result<String, String> {
        let (prog, rest) = argv.split_first().ok_or("empty argv")?;
        let out = self
            .command(prog)
            .args(rest)
            .output()
            .map_err(|e| format!("{argv:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{argv:?} in {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A self-signed CA-less certificate for `names` (DNS names or IPs), PEM.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCert {
    /// Mint a certificate valid for `names`.
    ///
    /// # Panics
    /// If rcgen refuses the names (a test bug).
    pub fn new(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed cert");
        TestCert {
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
        }
    }

    /// Write `cert.pem` and `key.pem` into `dir`; returns their paths.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
        let c = dir.join("cert.pem");
        let k = dir.join("key.pem");
        std::fs::write(&c, &self.cert_pem)?;
        std::fs::write(&k, &self.key_pem)?;
        Ok((c, k))
    }
}

/// Poll `f` every 10 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
