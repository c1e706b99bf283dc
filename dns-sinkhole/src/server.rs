//! Socket setup: UDP and TCP on the same address (port 0 allowed).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol as XProtocol;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use crate::DnsSinkhole;

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

/// Serve `sinkhole`: TCP through a hickory [`Server`] (`tcp_timeout` bounds
/// idle connections), UDP through one receive loop per socket: the batched
/// fast path ([`crate::fastpath::serve_udp_fast`]) or, with `fast_path`
/// off, the hickory-only [`serve_udp`] loop (the reference the fast path is
/// tested against).
pub fn serve(
    sinkhole: Arc<DnsSinkhole>,
    listeners: Listeners,
    tcp_timeout: Duration,
    fast_path: bool,
) -> Server<Shared<DnsSinkhole>> {
    for s in listeners.udp {
        if fast_path {
            tokio::spawn(crate::fastpath::serve_udp_fast(sinkhole.clone(), s));
        } else {
            tokio::spawn(serve_udp(sinkhole.clone(), s));
        }
    }
    let mut server = Server::new(Shared(sinkhole));
    server.register_listener(listeners.tcp, tcp_timeout, 64);
    server
}

/// Share one handler between hickory's TCP server and the UDP loops.
pub struct Shared<H>(pub Arc<H>);

#[async_trait::async_trait]
impl<H: RequestHandler> RequestHandler for Shared<H> {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// Sends one UDP answer, truncated (TC) to what the client can take: its
/// EDNS payload size (512 without EDNS), capped at 4096.
#[derive(Clone)]
pub(crate) struct UdpResponder {
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) dst: SocketAddr,
    pub(crate) limit: u16,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut bytes);
        enc.set_max_size(self.limit);
        let info = response
            .destructive_emit(&mut enc)
            .map_err(|e| NetError::from(e.to_string()))?;
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

/// FORMERR for a datagram whose header parsed but whose body did not
/// (compression loops, bad labels, junk): id and opcode echoed, no records.
fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    let h = raw.get(..12)?;
    let mut out = vec![0u8; 12];
    out[0] = h[0];
    out[1] = h[1];
    // QR=1, opcode echoed, RD echoed; RA=1; rcode FORMERR.
    out[2] = 0x80 | (h[2] & 0x78) | (h[2] & 0x01);
    out[3] = 0x80 | 0x01;
    Some(out)
}

/// Serve UDP on `socket` without hickory's per-socket stream machinery:
/// one receive loop, one task per datagram (it may wait for the PDP, the
/// audit spool and the upstream), answers sent straight from that task.
/// Parsing and the request handling are hickory's (`Request::from_bytes`,
/// the same [`RequestHandler`] as TCP); what is saved is the channel hop
/// and the per-message buffer copies of `UdpStream`.
pub async fn serve_udp<H: RequestHandler>(handler: Arc<H>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "udp recv");
                continue;
            }
        };
        // Shorter than a header, a response (no reflection), or a source
        // we cannot answer: drop.
        if n < 12 || buf[2] & 0x80 != 0 || src.port() == 0 {
            continue;
        }
        spawn_slow(handler.clone(), socket.clone(), buf[..n].to_vec(), src);
    }
}

/// Handle one datagram with hickory's parser and `handler` in its own task
/// (undecodable ⇒ FORMERR with the id echoed).
pub(crate) fn spawn_slow<H: RequestHandler>(
    handler: Arc<H>,
    socket: Arc<UdpSocket>,
    raw: Vec<u8>,
    src: SocketAddr,
) {
    if raw.len() < 12 {
        return;
    }
    let mut head = [0u8; 12];
    head.copy_from_slice(&raw[..12]);
    tokio::spawn(async move {
        match Request::from_bytes(raw, src, XProtocol::Udp) {
            Ok(req) => {
                let limit = udp_limit(&req);
                let responder = UdpResponder {
                    socket,
                    dst: src,
                    limit,
                };
                handler
                    .handle_request::<_, TokioTime>(&req, responder)
                    .await;
            }
            Err(_) => {
                if let Some(out) = formerr(&head) {
                    let _ = socket.send_to(&out, src).await;
                }
            }
        }
    });
}

/// Largest UDP answer the client of `req` accepts (EDNS payload size,
/// clamped to 512..=4096; 512 without EDNS).
pub(crate) fn udp_limit(req: &Request) -> u16 {
    req.edns
        .as_ref()
        .map_or(512, |e| e.max_payload().clamp(512, 4096))
}
