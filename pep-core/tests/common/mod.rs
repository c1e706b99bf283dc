//! Fake PDP and fake audit service on real loopback sockets.
//!
//! Each fake runs on its own thread with its own tokio runtime, so `stop()`
//! really closes every socket (dropping the runtime kills the connection
//! tasks), which is what a crashed service looks like to a client.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use secureops_proto::v1::audit_server::{Audit, AuditServer};
use secureops_proto::v1::invalidation::Kind;
use secureops_proto::v1::policy_decision_server::{PolicyDecision, PolicyDecisionServer};
use secureops_proto::v1::*;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What the fake PDP does with a Check.
#[derive(Debug, Clone)]
pub enum Mode {
    Answer,
    Hang,
    Error(tonic::Code),
    /// Send `Invalidation` (POLICY_CHANGED) on Watch, wait, then answer.
    InvalidateThenAnswer(Duration),
}

pub struct PdpKnobs {
    pub mode: Mutex<Mode>,
    pub answer: Mutex<CheckResponse>,
    pub calls: AtomicUsize,
    pub watch_tx: broadcast::Sender<Invalidation>,
    pub watchers: AtomicUsize,
    /// `traceparent` metadata of the last Check (`None`: absent).
    pub last_traceparent: Mutex<Option<String>>,
}

impl PdpKnobs {
    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock() = m;
    }
    pub fn set_answer(&self, a: CheckResponse) {
        *self.answer.lock() = a;
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    pub fn invalidate(&self, kind: Kind) {
        let _ = self.watch_tx.send(Invalidation {
            kind: kind as i32,
            ..Default::default()
        });
    }
}

#[derive(Clone)]
struct FakePdpSvc(Arc<PdpKnobs>);

#[tonic::async_trait]
impl PolicyDecision for FakePdpSvc {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        *self.0.last_traceparent.lock() = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let mode = self.0.mode.lock().clone();
        match mode {
            Mode::Answer => Ok(Response::new(self.0.answer.lock().clone())),
            Mode::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Mode::Error(code) => Err(Status::new(code, "fake error")),
            Mode::InvalidateThenAnswer(wait) => {
                self.0.invalidate(Kind::PolicyChanged);
                tokio::time::sleep(wait).await;
                Ok(Response::new(self.0.answer.lock().clone()))
            }
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<Invalidation, Status>> + Send>>;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.0.watchers.fetch_add(1, Ordering::SeqCst);
        let rx = self.0.watch_tx.subscribe();
        let hello = Invalidation {
            kind: Kind::Hello as i32,
            ..Default::default()
        };
        let s = tokio_stream::once(Ok(hello)).chain(
            BroadcastStream::new(rx).map(|r| r.map_err(|e| Status::internal(e.to_string()))),
        );
        Ok(Response::new(Box::pin(s)))
    }
}

/// A service running on its own thread + runtime.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Crash-stop: every socket of the service is closed.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_on_thread<F, Fut>(addr: SocketAddr, make: F) -> Running
where
    F: FnOnce(TcpListenerStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            // The port may still be in TIME_WAIT / held briefly: retry.
            let deadline = Instant::now() + Duration::from_secs(5);
            let listener = loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            };
            ready_tx
                .send(listener.local_addr().expect("addr"))
                .expect("ready");
            let serve = make(TcpListenerStream::new(listener));
            tokio::select! {
                _ = serve => {}
                _ = stop_rx => {}
            }
        });
        // Dropping the runtime aborts every connection task.
        drop(rt);
    });
    let addr = ready_rx.recv().expect("fake service started");
    Running {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

pub fn allow_answer(scope: CacheScope, ttl_ms: u32) -> CheckResponse {
    CheckResponse {
        decision: Verdict::Allow as i32,
        reason: "rule:test".into(),
        rule_id: "test".into(),
        policy_version: 1,
        cache_scope: scope as i32,
        cache_ttl_ms: ttl_ms,
        ..Default::default()
    }
}

pub fn new_pdp_knobs() -> Arc<PdpKnobs> {
    let (watch_tx, _) = broadcast::channel(64);
    Arc::new(PdpKnobs {
        mode: Mutex::new(Mode::Answer),
        answer: Mutex::new(allow_answer(CacheScope::None, 0)),
        calls: AtomicUsize::new(0),
        watch_tx,
        watchers: AtomicUsize::new(0),
        last_traceparent: Mutex::new(None),
    })
}

/// Start the fake PDP on `addr` (port 0 for a fresh one).
pub fn start_pdp(addr: SocketAddr, knobs: Arc<PdpKnobs>) -> Running {
    run_on_thread(addr, move |incoming| async move {
        let _ = tonic::transport::Server::builder()
            .add_service(PolicyDecisionServer::new(FakePdpSvc(knobs)))
            .serve_with_incoming(incoming)
            .await;
    })
}

/// A loopback address nobody listens on (bound once, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------- audit

/// The fake audit service's state: a deduplicating log.
#[derive(Default)]
pub struct AuditLog {
    pub seen: Mutex<HashSet<(String, u64)>>,
    /// Appended entries in order (duplicates are not appended).
    pub entries: Mutex<Vec<(String, u64, String)>>,
    pub duplicates: AtomicUsize,
    pub rejected_auth: AtomicUsize,
    pub token: String,
}

impl AuditLog {
    pub fn new(token: &str) -> Arc<Self> {
        Arc::new(AuditLog {
            token: token.to_string(),
            ..Default::default()
        })
    }
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[derive(Clone)]
struct FakeAuditSvc(Arc<AuditLog>);

#[tonic::async_trait]
impl Audit for FakeAuditSvc {
    type AppendStream = Pin<Box<dyn Stream<Item = Result<AppendAck, Status>> + Send>>;

    async fn append(
        &self,
        req: Request<Streaming<AuditRecord>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let want = format!("Bearer {}", self.0.token);
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == want);
        if !ok {
            self.0.rejected_auth.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unauthenticated("bad token"));
        }
        let log = self.0.clone();
        let mut inbound = req.into_inner();
        let s = async_stream_acks(move |tx| async move {
            while let Ok(Some(rec)) = inbound.message().await {
                let key = (rec.source_id.clone(), rec.source_seq);
                let fresh = log.seen.lock().insert(key);
                let mut index = 0;
                if fresh {
                    let mut e = log.entries.lock();
                    index = e.len() as u64;
                    let host = rec
                        .finding
                        .as_ref()
                        .map(|f| f.host.clone())
                        .unwrap_or_default();
                    e.push((rec.source_id.clone(), rec.source_seq, host));
                } else {
                    log.duplicates.fetch_add(1, Ordering::SeqCst);
                }
                let ack = AppendAck {
                    source_id: rec.source_id,
                    source_seq: rec.source_seq,
                    index,
                    duplicate: !fresh,
                    error: String::new(),
                };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(s))
    }

    async fn checkpoint(
        &self,
        _r: Request<CheckpointRequest>,
    ) -> Result<Response<SignedCheckpoint>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn prove(&self, _r: Request<ProveRequest>) -> Result<Response<InclusionProof>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn consistency(
        &self,
        _r: Request<ConsistencyRequest>,
    ) -> Result<Response<ConsistencyProof>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type TailStream = Pin<Box<dyn Stream<Item = Result<TailEntry, Status>> + Send>>;
    async fn tail(&self, _r: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn async_stream_acks<F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = Result<AppendAck, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<AppendAck, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

pub fn start_audit(addr: SocketAddr, log: Arc<AuditLog>) -> Running {
    run_on_thread(addr, move |incoming| async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AuditServer::new(FakeAuditSvc(log)))
            .serve_with_incoming(incoming)
            .await;
    })
}

/// Poll `cond` every 5 ms until true or `limit` passes.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}
