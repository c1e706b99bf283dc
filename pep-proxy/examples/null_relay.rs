//! The bench floor for CONNECT proxies: a relay that does only what *any*
//! CONNECT proxy must do and nothing SecureOps adds. It reads the request
//! head, looks the host up in a static table, dials, answers `200` and pumps
//! bytes with the proxy's own tunnel code (copy, then `splice(2)`). No
//! policy, no audit record, no attribution, no metrics, no hyper.
//!
//! Run next to `secureops-proxy` in one window, it shows how much of the
//! proxy's CPU per tunnel and tunnels/s is the policy path and how much is
//! the relaying itself (see `pep-proxy/bench/floor_pairs.sh`). It is not a
//! product: it allows everything in its table.
//!
//!   cargo run --release -p secureops-proxy --example null_relay -- \
//!       127.0.0.13:3128 host=127.0.0.2,other=127.0.0.3

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(table)) = (args.next(), args.next()) else {
        bail!("usage: null_relay LISTEN HOST=IP[,HOST=IP...]");
    };
    let mut hosts: HashMap<String, IpAddr> = HashMap::new();
    for pair in table.split(',').filter(|p| !p.is_empty()) {
        let (h, ip) = pair
            .split_once('=')
            .with_context(|| format!("{pair:?}: expected HOST=IP"))?;
        hosts.insert(h.to_ascii_lowercase(), ip.parse()?);
    }
    let hosts = Arc::new(hosts);
    // One thread, like the proxy on one core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        eprintln!("LISTENING null-relay {}", listener.local_addr()?);
        loop {
            let (client, _) = listener.accept().await?;
            let hosts = hosts.clone();
            tokio::spawn(async move {
                let _ = relay(client, &hosts).await;
            });
        }
    })
}

async fn relay(mut client: TcpStream, hosts: &HashMap<String, IpAddr>) -> Result<()> {
    client.set_nodelay(true)?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf).await?;
        if n == 0 || head.len() + n > 8192 {
            bail!("no complete head");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line)?;
    let mut parts = line.split(' ');
    let (Some("CONNECT"), Some(authority)) = (parts.next(), parts.next()) else {
        client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await?;
        bail!("not CONNECT");
    };
    let (host, port) = authority.rsplit_once(':').context("no port")?;
    let Some(ip) = hosts.get(&host.to_ascii_lowercase()) else {
        client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await?;
        bail!("unknown host");
    };
    let mut upstream = TcpStream::connect((*ip, port.parse::<u16>()?)).await?;
    upstream.set_nodelay(true)?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    secureops_proxy::tunnel::tunnel(
        &mut client,
        &mut upstream,
        secureops_proxy::tunnel::SPLICE_AFTER,
    )
    .await?;
    Ok(())
}
