//! The rootless tier of `secureops run`: an unprivileged user namespace with
//! its own (empty) network namespace. Inside, only two things exist on
//! loopback: a relay to the proxy and a DNS relay to the sinkhole; there is
//! no route anywhere else, so a program that ignores the proxy variables
//! cannot connect at all (fail closed, not transparent).
//!
//! The relays cross the namespace boundary through Unix sockets in a private
//! directory (the filesystem is shared): inside, `secureops __ns-shim` listens
//! on 127.0.0.1 and forwards each connection to the host side, which connects
//! to the real proxy / sinkhole. DNS over UDP is carried as DNS-over-TCP
//! frames (RFC 1035 §4.2.2) to the sinkhole's TCP listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};

/// Port of the proxy relay inside the namespace.
pub const INNER_PROXY_PORT: u16 = 3128;

/// Whether unprivileged user + network namespaces work here.
pub fn available() -> Result<(), String> {
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--mount", "true"])
        .output()
        .map_err(|e| format!("`unshare` (util-linux) is not available: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unprivileged user namespaces are not allowed here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Host side: accept on `sock`, connect each to `target`, splice.
pub fn spawn_host_relay(sock: &Path, target: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    let listener =
        UnixListener::bind(sock).with_context(|| format!("binding {}", sock.display()))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inner, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(target).await {
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inner, &mut up).await;
                }
            });
        }
    }))
}

/// `secureops __ns-shim`: runs inside the new namespaces.
#[derive(Debug, Args)]
pub struct ShimArgs {
    /// Unix socket of the host-side proxy relay.
    #[arg(long)]
    pub proxy_sock: PathBuf,
    /// Unix socket of the host-side DNS relay (TCP framing).
    #[arg(long)]
    pub dns_sock: PathBuf,
    /// resolv.conf to bind-mount over /etc/resolv.conf.
    #[arg(long)]
    pub resolv_conf: PathBuf,
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

fn run_quiet(argv: &[&str]) -> Result<()> {
    let st = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !st.success() {
        bail!("{} failed ({st})", argv.join(" "));
    }
    Ok(())
}

async fn tcp_to_unix(listener: TcpListener, sock: PathBuf) {
    while let Ok((mut c, _)) = listener.accept().await {
        let sock = sock.clone();
        tokio::spawn(async move {
            if let Ok(mut u) = UnixStream::connect(&sock).await {
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            }
        });
    }
}

/// One UDP query → one DNS-over-TCP exchange through the relay.
async fn dns_over_relay(sock: &Path, query: &[u8]) -> Result<Vec<u8>> {
    let mut u = UnixStream::connect(sock).await?;
    let len = u16::try_from(query.len()).context("query too long")?;
    u.write_all(&len.to_be_bytes()).await?;
    u.write_all(query).await?;
    let n = u.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    u.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn udp_dns(sock_udp: UdpSocket, relay: PathBuf) {
    let sock_udp = std::sync::Arc::new(sock_udp);
    let mut buf = vec![0u8; 4096];
    while let Ok((n, peer)) = sock_udp.recv_from(&mut buf).await {
        let q = buf[..n].to_vec();
        let (s, relay) = (sock_udp.clone(), relay.clone());
        tokio::spawn(async move {
            if let Ok(Ok(ans)) =
                tokio::time::timeout(Duration::from_secs(5), dns_over_relay(&relay, &q)).await
            {
                let _ = s.send_to(&ans, peer).await;
            }
        });
    }
}

/// The shim: bring up loopback, point resolv.conf at 127.0.0.1, start the
/// relays, run CMD with the proxy variables, return its exit code.
pub async fn shim(a: ShimArgs) -> Result<u8> {
    run_quiet(&["ip", "link", "set", "lo", "up"])?;
    run_quiet(&[
        "mount",
        "--bind",
        &a.resolv_conf.display().to_string(),
        "/etc/resolv.conf",
    ])?;
    let proxy = TcpListener::bind(("127.0.0.1", INNER_PROXY_PORT)).await?;
    let dns_tcp = TcpListener::bind(("127.0.0.1", 53)).await?;
    let dns_udp = UdpSocket::bind(("127.0.0.1", 53)).await?;
    tokio::spawn(tcp_to_unix(proxy, a.proxy_sock.clone()));
    tokio::spawn(tcp_to_unix(dns_tcp, a.dns_sock.clone()));
    tokio::spawn(udp_dns(dns_udp, a.dns_sock.clone()));
    let url = format!("http://127.0.0.1:{INNER_PROXY_PORT}");
    let mut cmd = tokio::process::Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    crate::run::set_proxy_env(&mut cmd, &url);
    let st = cmd
        .status()
        .await
        .with_context(|| format!("running {:?}", a.cmd))?;
    Ok(crate::run::exit_code(st))
}
