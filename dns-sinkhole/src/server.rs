//! Socket setup: UDP and TCP on the same address (port 0 allowed).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::server::RequestHandler;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

/// Bound sockets, ready to be registered with a hickory [`Server`].
#[derive(Debug)]
pub struct Listeners {
    pub addr: SocketAddr,
    pub udp: Vec<UdpSocket>,
    pub tcp: TcpListener,
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // Absorb bursts (dnsperf, a busy agent) without kernel drops.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Bind `udp_sockets` UDP sockets (SO_REUSEPORT when more than one, so the
/// kernel spreads queries over the receive loops) and one TCP listener, all
/// on the same port. With port 0 the UDP port is chosen first and TCP binds
/// the same number; if that TCP port is taken, retry with a new UDP port.
pub fn bind(addr: SocketAddr, udp_sockets: usize) -> io::Result<Listeners> {
    let n = udp_sockets.max(1);
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last_err = io::Error::other("no bind attempt");
    for _ in 0..attempts {
        let first = udp_socket(addr, n > 1)?;
        let bound = first.local_addr()?;
        let tcp = match tcp_listener(bound) {
            Ok(t) => t,
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last_err = e;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut udp = vec![UdpSocket::from_std(first)?];
        for _ in 1..n {
            udp.push(UdpSocket::from_std(udp_socket(bound, true)?)?);
        }
        return Ok(Listeners {
            addr: bound,
            udp,
            tcp: TcpListener::from_std(tcp)?,
        });
    }
    Err(last_err)
}

/// Register the listeners with a hickory [`Server`] serving `handler`.
/// `tcp_timeout` bounds idle TCP connections.
pub fn serve<H: RequestHandler>(
    handler: H,
    listeners: Listeners,
    tcp_timeout: Duration,
) -> Server<H> {
    let mut server = Server::new(handler);
    for s in listeners.udp {
        server.register_socket(s);
    }
    server.register_listener(listeners.tcp, tcp_timeout, 64);
    server
}
