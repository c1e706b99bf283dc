//! Byte pumping for allowed tunnels, sized for many idle connections.
//!
//! `tokio::io::copy_bidirectional` keeps two 8 KiB buffers alive for the
//! whole life of a tunnel, idle or not: 16 KiB per tunnel before the kernel's
//! own socket buffers. Here a direction owns a buffer only while data is
//! flowing: it waits for readiness with no buffer, takes a 64 KiB buffer
//! (uninitialised capacity, so no memset), drains the socket, and drops the
//! buffer again when the socket would block. An idle tunnel therefore costs
//! two registered sockets and a small task; a bulk tunnel reuses one buffer
//! per direction for as long as the burst lasts.
//!
//! Half-close is propagated (read EOF ⇒ `shutdown(Write)` on the other side)
//! and the other direction keeps running, unlike proxies that drop the whole
//! tunnel on a client half-close.

use std::io;
use std::net::Shutdown;

use tokio::net::TcpStream;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelStats {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

const BUF: usize = 64 * 1024;

/// Pump bytes both ways until both directions finished or one failed.
pub async fn tunnel(client: &TcpStream, upstream: &TcpStream) -> io::Result<TunnelStats> {
    let up = pump(client, upstream);
    let down = pump(upstream, client);
    tokio::pin!(up, down);
    let mut stats = TunnelStats::default();
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    Ok(n) => stats.client_to_upstream = n,
                    Err(e) => return Err(e),
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match r {
                    Ok(n) => stats.upstream_to_client = n,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(stats)
}

async fn pump(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let mut buf: Vec<u8> = Vec::with_capacity(BUF);
        loop {
            buf.clear();
            match src.try_read_buf(&mut buf) {
                Ok(0) => {
                    // Propagate the half-close; ignore ENOTCONN if the peer
                    // already went away.
                    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                    return Ok(total);
                }
                Ok(n) => {
                    write_all(dst, &buf[..n]).await?;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Write all of `data` to a shared-reference `TcpStream`.
pub async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
