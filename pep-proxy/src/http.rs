//! Plain HTTP/1.1 through the proxy, request by request, on hyper.
//!
//! The first request head was already read (and bounded) by the proxy; the
//! connection is replayed into a hyper HTTP/1 server so hyper owns message
//! framing (Content-Length, chunked, keep-alive). *Every* request of a
//! keep-alive connection is parsed, checked (absolute URI vs `Host`,
//! userinfo, scheme), decided and audited before the proxy dials the
//! checked IP and forwards it in origin-form. A denied request gets `403`
//! and the connection stays usable for the next request.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::parse::{Authority, parse_absolute_uri, parse_authority};
use crate::{
    Decision, EgressProxy, HostSource, PdpOutcome, PeekedHost, ProxyError, Verdict,
    decision_header, deny_body,
};

type Body = Either<Full<Bytes>, Incoming>;

/// The first request of a transparent HTTP connection, already decided and
/// audited before hyper took over: it must not be decided twice.
pub(crate) struct PreApproved {
    pub host: String,
    pub port: u16,
}

enum Mode {
    Explicit,
    Transparent {
        orig: SocketAddr,
        preapproved: std::sync::Mutex<Option<PreApproved>>,
    },
}

struct Ctx {
    proxy: Arc<EgressProxy>,
    peer: SocketAddr,
    /// `None` when the proxy attributes nothing (see `local_for_attribution`).
    local: Option<SocketAddr>,
    mode: Mode,
    upstream: tokio::sync::Mutex<Option<(SocketAddr, SendRequest<Incoming>)>>,
}

pub(crate) async fn serve_explicit(
    proxy: Arc<EgressProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    buffered: Vec<u8>,
) -> Result<(), ProxyError> {
    let ctx = Arc::new(Ctx {
        proxy,
        peer,
        local,
        mode: Mode::Explicit,
        upstream: tokio::sync::Mutex::new(None),
    });
    serve(ctx, stream, buffered).await
}

pub(crate) async fn serve_transparent(
    proxy: Arc<EgressProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    orig: SocketAddr,
    buffered: Vec<u8>,
    first: PreApproved,
) -> Result<(), ProxyError> {
    let ctx = Arc::new(Ctx {
        proxy,
        peer,
        local: Some(local),
        mode: Mode::Transparent {
            orig,
            preapproved: std::sync::Mutex::new(Some(first)),
        },
        upstream: tokio::sync::Mutex::new(None),
    });
    serve(ctx, stream, buffered).await
}

async fn serve(ctx: Arc<Ctx>, stream: TcpStream, buffered: Vec<u8>) -> Result<(), ProxyError> {
    let cfg = ctx.proxy.config().clone();
    let io = Prefixed {
        pre: buffered,
        pos: 0,
        inner: stream,
    };
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let res = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = res
        && (e.is_parse() || e.is_parse_too_large())
    {
        // hyper already answered 400/431; record the attempt once.
        let req = ctx
            .proxy
            .unparsed_request(ctx.peer, ctx.local, "-", HostSource::HttpHost)
            .await;
        let reason = if e.is_parse_too_large() {
            "header_too_large"
        } else {
            "malformed_request"
        };
        let mut v = Verdict {
            req,
            outcome: PdpOutcome::new(Decision::Deny, reason),
            detail: e.to_string(),
        };
        ctx.proxy.record(mode_name(&ctx.mode), &mut v, None).await;
    }
    Ok(())
}

fn mode_name(m: &Mode) -> &'static str {
    match m {
        Mode::Explicit => "explicit",
        Mode::Transparent { .. } => "transparent",
    }
}

impl Ctx {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        match &self.mode {
            Mode::Explicit => self.handle_explicit(req).await,
            Mode::Transparent { orig, preapproved } => {
                self.handle_transparent(req, *orig, preapproved).await
            }
        }
    }

    async fn refuse(
        &self,
        status: StatusCode,
        reason: &str,
        seen: &str,
        detail: String,
    ) -> Response<Body> {
        let req = self
            .proxy
            .unparsed_request(self.peer, self.local, seen, HostSource::HttpHost)
            .await;
        let mut v = Verdict {
            req,
            outcome: PdpOutcome::new(Decision::Deny, reason),
            detail,
        };
        self.proxy.record(mode_name(&self.mode), &mut v, None).await;
        refusal(status, &v.outcome, &v.req.request_id)
    }

    async fn handle_explicit(&self, req: Request<Incoming>) -> Response<Body> {
        let target = req.uri().to_string();
        if req.method() == http::Method::CONNECT {
            return self
                .refuse(
                    StatusCode::FORBIDDEN,
                    "connect_after_request",
                    &target,
                    "CONNECT must be the first request of a connection".into(),
                )
                .await;
        }
        let uri = match parse_absolute_uri(&target) {
            Ok(u) => u,
            Err(e) => {
                let status = if target.starts_with('/') {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::FORBIDDEN
                };
                let reason = if target.starts_with('/') {
                    "not_absolute_form"
                } else {
                    e.reason()
                };
                return self.refuse(status, reason, &target, e.to_string()).await;
            }
        };
        let hosts = host_headers(req.headers());
        let host_check = match hosts.as_slice() {
            [] if req.version() == Version::HTTP_10 => Ok(()),
            [] => Err(("missing_host", String::new())),
            [one] => match parse_authority(one, Some(80)) {
                Ok(h) if h.same_destination(&uri.authority) => Ok(()),
                Ok(_) => Err((
                    "host_mismatch",
                    format!("host={one} uri={}", uri.authority.host),
                )),
                Err(e) => Err((e.reason(), format!("host={one}"))),
            },
            _ => Err(("host_mismatch", "several Host headers".to_string())),
        };
        if let Err((reason, detail)) = host_check {
            return self
                .refuse(StatusCode::FORBIDDEN, reason, &uri.authority.host, detail)
                .await;
        }
        let ph = PeekedHost::from_authority(&uri.authority, HostSource::HttpHost);
        let mut creq = self.proxy.new_request(self.peer, self.local, &ph).await;
        let outcome = self.proxy.decide(&mut creq, uri.authority.ip_literal).await;
        let mut v = Verdict {
            req: creq,
            outcome,
            detail: String::new(),
        };
        let ip = v.req.ip;
        if v.outcome.decision.is_allow() && ip.is_none() {
            v.outcome = PdpOutcome::new(Decision::Deny, "no_address");
        }
        let dial = if v.outcome.decision.is_allow() {
            ip
        } else {
            None
        };
        self.proxy.record("explicit", &mut v, dial).await;
        match (v.outcome.decision.is_allow(), ip) {
            (true, Some(ip)) => {
                self.forward(
                    req,
                    SocketAddr::new(ip, uri.authority.port),
                    &uri.origin_form,
                    &uri.authority,
                )
                .await
            }
            _ => refusal(StatusCode::FORBIDDEN, &v.outcome, &v.req.request_id),
        }
    }

    async fn handle_transparent(
        &self,
        req: Request<Incoming>,
        orig: SocketAddr,
        preapproved: &std::sync::Mutex<Option<PreApproved>>,
    ) -> Response<Body> {
        let target = req.uri().to_string();
        let origin_form = match req.uri().path_and_query() {
            Some(pq) if target.starts_with('/') => pq.as_str().to_string(),
            _ => {
                return self
                    .refuse(
                        StatusCode::FORBIDDEN,
                        "not_origin_form",
                        &target,
                        "transparent HTTP expects origin-form targets".into(),
                    )
                    .await;
            }
        };
        let hosts = host_headers(req.headers());
        let authority = match hosts.as_slice() {
            [one] => match parse_authority(one, Some(orig.port())) {
                Ok(a) if a.port == orig.port() => a,
                Ok(_) => {
                    return self
                        .refuse(
                            StatusCode::FORBIDDEN,
                            "host_port_mismatch",
                            one,
                            String::new(),
                        )
                        .await;
                }
                Err(e) => {
                    return self
                        .refuse(StatusCode::FORBIDDEN, e.reason(), one, e.to_string())
                        .await;
                }
            },
            [] => {
                return self
                    .refuse(StatusCode::FORBIDDEN, "missing_host", "-", String::new())
                    .await;
            }
            _ => {
                return self
                    .refuse(
                        StatusCode::FORBIDDEN,
                        "host_mismatch",
                        "-",
                        "several Host headers".into(),
                    )
                    .await;
            }
        };
        let pre = preapproved.lock().ok().and_then(|mut g| g.take());
        if let Some(p) = pre
            && p.host == authority.host
            && p.port == authority.port
        {
            return self.forward(req, orig, &origin_form, &authority).await;
        }
        let ph = PeekedHost::from_authority(&authority, HostSource::HttpHost);
        let mut creq = self.proxy.new_request(self.peer, self.local, &ph).await;
        creq.ip = Some(orig.ip());
        let mut detail = String::new();
        let outcome = match authority.ip_literal {
            Some(lit) if lit != orig.ip() => PdpOutcome::new(Decision::Deny, "host_ip_mismatch"),
            Some(lit) => {
                creq.resolved_ips = vec![lit];
                self.proxy.ask_pdp(&creq).await
            }
            // Name first: a Host the policy refuses is never looked up.
            None => {
                let (outcome, why) = self.proxy.decide_name(&mut creq, Some(orig.ip())).await;
                if let Some(why) = why {
                    detail = why;
                }
                outcome
            }
        };
        let mut v = Verdict {
            req: creq,
            outcome,
            detail,
        };
        let allow = v.outcome.decision.is_allow();
        self.proxy
            .record(
                "transparent",
                &mut v,
                if allow { Some(orig.ip()) } else { None },
            )
            .await;
        if v.outcome.decision.is_allow() {
            self.forward(req, orig, &origin_form, &authority).await
        } else {
            refusal(StatusCode::FORBIDDEN, &v.outcome, &v.req.request_id)
        }
    }

    /// Forward one allowed request to `addr` (the checked IP), reusing this
    /// client connection's upstream connection when it goes to the same
    /// address.
    async fn forward(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
        origin_form: &str,
        authority: &Authority,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST) {
            let host = if authority.ip_literal.is_some_and(|ip: IpAddr| ip.is_ipv6()) {
                format!("[{}]", authority.host)
            } else {
                authority.host.clone()
            };
            let value = if authority.port == 80 {
                host
            } else {
                format!("{host}:{}", authority.port)
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let Ok(uri) = origin_form.parse::<http::Uri>() else {
            return bad_gateway("bad origin-form target");
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        let mut slot = self.upstream.lock().await;
        let reuse = matches!(&*slot, Some((a, s)) if *a == addr && !s.is_closed());
        if !reuse {
            *slot = None;
            let stream = match self.proxy.dial(addr.ip(), addr.port()).await {
                Ok(s) => s,
                Err(e) => {
                    self.proxy.metrics().upstream_errors.inc();
                    return bad_gateway(&format!("upstream connect failed: {e}"));
                }
            };
            let (sender, conn) =
                match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                    Ok(x) => x,
                    Err(e) => return bad_gateway(&format!("upstream handshake failed: {e}")),
                };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            *slot = Some((addr, sender));
        }
        let Some((_, sender)) = slot.as_mut() else {
            return bad_gateway("no upstream connection");
        };
        if sender.ready().await.is_err() {
            *slot = None;
            return bad_gateway("upstream connection closed");
        }
        match sender.send_request(upstream_req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Right(body))
            }
            Err(e) => {
                *slot = None;
                bad_gateway(&format!("upstream error: {e}"))
            }
        }
    }
}

fn host_headers(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::HOST)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
        .collect()
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1) and the ones a proxy must
/// not pass on (`Proxy-*`); `Upgrade` is dropped, so no protocol switch can
/// smuggle a tunnel through a plain-HTTP decision.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        h.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
}

fn refusal(status: StatusCode, outcome: &PdpOutcome, request_id: &str) -> Response<Body> {
    let body = deny_body(outcome, request_id);
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&decision_header(outcome)) {
        h.insert("x-secureops-decision", v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-secureops-request-id", v);
    }
    resp
}

fn bad_gateway(msg: &str) -> Response<Body> {
    tracing::info!(error = msg, "plain HTTP forward failed");
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(format!("{msg}\n")))));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

/// A stream that first yields already-read bytes, then the socket.
struct Prefixed {
    pre: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.pre.len() {
            let n = (self.pre.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.pre[start..start + n]);
            self.pos += n;
            if self.pos == self.pre.len() {
                self.pre = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
