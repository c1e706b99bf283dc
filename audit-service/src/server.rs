//! The sequencer (group commit) and the `secureops.v1.Audit` gRPC service.

use crate::encoding::{self, Hash};
use crate::metrics::Metrics;
use crate::storage::{Appended, LogWriter, SharedLog, StoreError};
use secureops_proto::v1::audit_server::Audit;
use secureops_proto::v1::{
    AppendAck, AuditRecord, CheckpointRequest, ConsistencyProof, ConsistencyRequest,
    InclusionProof, ProveRequest, SignedCheckpoint, TailEntry, TailRequest,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type AckResult = Result<AppendAck, Status>;

/// Sequencer tuning.
#[derive(Debug, Clone)]
pub struct SequencerConfig {
    /// Most records per batch (one fdatasync per batch).
    pub batch_max: usize,
    /// Longest wait for more records once a batch has started.
    pub batch_delay: Duration,
    /// Sign a checkpoint at least this often while entries arrive.
    pub checkpoint_interval: Duration,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            batch_max: 4096,
            batch_delay: Duration::ZERO,
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

/// One record on its way to the writer, with a reserved slot in its
/// stream's ack channel (so the writer never blocks on a slow client).
struct Item {
    /// The record, or (source_id, source_seq, why) when it was rejected;
    /// the rejection ack echoes the record's key so a shipper can match it.
    record: Result<AuditRecord, (String, u64, String)>,
    reply: mpsc::OwnedPermit<AckResult>,
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Sequencer {
    tx: mpsc::Sender<Item>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Item")
    }
}

impl Sequencer {
    /// Starts the writer thread. It signs a checkpoint right away when the
    /// log has none (or entries past the last one, e.g. after a crash).
    pub fn start(
        writer: LogWriter,
        cfg: SequencerConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Item>(cfg.batch_max.max(1) * 4);
        let (stx, srx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("audit-sequencer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .map_err(|e| StoreError::Io {
                        path: "sequencer runtime".into(),
                        source: e,
                    })?;
                rt.block_on(writer_loop(writer, rx, srx, cfg, metrics))
            })?;
        Ok(Self {
            tx,
            shutdown: Some(stx),
            thread: Some(thread),
        })
    }

    fn sender(&self) -> mpsc::Sender<Item> {
        self.tx.clone()
    }

    /// Stops the writer: records already queued are appended and acked, a
    /// final checkpoint is signed, then the thread ends.
    pub fn shutdown(mut self) -> Result<(), StoreError> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(StoreError::Corrupt("sequencer thread panicked".into())),
            None => Ok(()),
        }
    }

    /// True while the writer thread runs (false after a fatal I/O error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

async fn writer_loop(
    mut w: LogWriter,
    mut rx: mpsc::Receiver<Item>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
    cfg: SequencerConfig,
    metrics: Arc<Metrics>,
) -> Result<(), StoreError> {
    let has_cp = w.checkpoint(false)?;
    if has_cp.is_some() {
        metrics.checkpoints.inc();
    }
    let mut last_cp = Instant::now();
    let mut cp_size = w.size();
    let mut batch: Vec<Item> = Vec::with_capacity(cfg.batch_max);
    loop {
        let dirty = w.size() > cp_size;
        let cp_deadline = tokio::time::Instant::from_std(last_cp + cfg.checkpoint_interval);
        let first = tokio::select! {
            biased;
            _ = &mut shutdown => None,
            item = rx.recv() => item,
            _ = tokio::time::sleep_until(cp_deadline), if dirty => {
                if w.checkpoint(false)?.is_some() {
                    metrics.checkpoints.inc();
                }
                last_cp = Instant::now();
                cp_size = w.size();
                continue;
            }
        };
        let Some(first) = first else {
            // Shutdown (or every sender gone): drain what is queued, then a
            // final checkpoint.
            rx.close();
            while let Ok(item) = rx.try_recv() {
                batch.push(item);
                if batch.len() >= cfg.batch_max {
                    commit(&mut w, &mut batch, &metrics)?;
                }
            }
            commit(&mut w, &mut batch, &metrics)?;
            if w.checkpoint(false)?.is_some() {
                metrics.checkpoints.inc();
            }
            return Ok(());
        };
        batch.push(first);
        while batch.len() < cfg.batch_max {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        if batch.len() < cfg.batch_max && !cfg.batch_delay.is_zero() {
            let deadline = tokio::time::Instant::now() + cfg.batch_delay;
            while batch.len() < cfg.batch_max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(i)) => batch.push(i),
                    _ => break,
                }
            }
        }
        commit(&mut w, &mut batch, &metrics)?;
        if last_cp.elapsed() >= cfg.checkpoint_interval && w.size() > cp_size {
            if w.checkpoint(false)?.is_some() {
                metrics.checkpoints.inc();
            }
            last_cp = Instant::now();
            cp_size = w.size();
        }
    }
}

/// Appends the valid records of `batch` (one fdatasync), then acks every
/// item in order. On a storage error nothing is acked and the error ends the
/// sequencer (fail closed: clients see the stream fail and replay later).
fn commit(w: &mut LogWriter, batch: &mut Vec<Item>, metrics: &Metrics) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let t0 = Instant::now();
    // One `audit.append` span per traced record, opened before the write so
    // it covers the append and its fdatasync; `None` for untraced records.
    let spans: Vec<Option<tracing::Span>> = batch
        .iter()
        .map(|i| i.record.as_ref().ok().and_then(append_span))
        .collect();
    let valid: Vec<(&str, u64, &secureops_proto::v1::AuditFinding)> = batch
        .iter()
        .filter_map(|i| match &i.record {
            Ok(r) => r
                .finding
                .as_ref()
                .map(|f| (r.source_id.as_str(), r.source_seq, f)),
            Err(_) => None,
        })
        .collect();
    let outcomes = match w.append_batch(valid) {
        Ok(o) => o,
        Err(e) => {
            for item in batch.drain(..) {
                item.reply
                    .send(Err(Status::unavailable("audit storage failure")));
            }
            return Err(e);
        }
    };
    metrics.fsync_seconds.observe(t0.elapsed().as_secs_f64());
    metrics.batch_records.observe(batch.len() as f64);
    let mut outs = outcomes.into_iter();
    for (item, span) in batch.drain(..).zip(spans) {
        let ack = match item.record {
            Ok(r) => {
                let Appended { index, duplicate } = outs.next().unwrap_or(Appended {
                    index: 0,
                    duplicate: false,
                });
                if let Some(span) = span {
                    span.record("index", index);
                    span.record("duplicate", duplicate);
                }
                if duplicate {
                    metrics.duplicates.inc();
                } else {
                    metrics.appended.inc();
                }
                AppendAck {
                    source_id: r.source_id,
                    source_seq: r.source_seq,
                    index,
                    duplicate,
                    error: String::new(),
                }
            }
            Err((source_id, source_seq, msg)) => {
                metrics.rejected.inc();
                AppendAck {
                    source_id,
                    source_seq,
                    index: 0,
                    duplicate: false,
                    error: msg,
                }
            }
        };
        item.reply.send(Ok(ack));
    }
    metrics.entries.set(w.size() as i64);
    Ok(())
}

/// Reads a W3C `traceparent` from a record's `trace_parent` field for the
/// global OpenTelemetry propagator.
struct TraceParentCarrier<'a>(&'a str);

impl opentelemetry::propagation::Extractor for TraceParentCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// An `audit.append` span parented on the PEP's decision span (the record's
/// `trace_parent`), so proxy → PDP → audit shows up as one trace.
///
/// Cheap when tracing is off: an untraced record (empty `trace_parent`, what
/// a PEP without an OTLP exporter sends) returns `None` at once; a malformed
/// traceparent returns `None` before any span exists (so nothing is
/// exported for it); a bad traceparent never affects the append itself.
fn append_span(r: &AuditRecord) -> Option<tracing::Span> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    // A W3C traceparent is 55 bytes; anything much longer is not one (and
    // is not worth parsing: the field is not length-checked on the way in
    // because it is never stored).
    if r.trace_parent.is_empty() || r.trace_parent.len() > 128 {
        return None;
    }
    // Parse before creating the span: a span once created is exported on
    // drop (as a root span) even if it is then discarded here.
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&TraceParentCarrier(&r.trace_parent))
    });
    if !parent.span().span_context().is_remote() || !parent.span().span_context().is_valid() {
        return None;
    }
    let span = tracing::info_span!(
        "audit.append",
        source_id = %r.source_id,
        source_seq = r.source_seq,
        index = tracing::field::Empty,
        duplicate = tracing::field::Empty,
    );
    if span.is_disabled() {
        return None;
    }
    // Without an OpenTelemetry layer (no exporter) there is nothing to link.
    span.set_parent(parent).ok()?;
    Some(span)
}

/// Per-source Append credentials: `SHA-256(token) -> source_id`. Tokens are
/// looked up by hash so the comparison does not leak token prefixes through
/// timing.
#[derive(Debug, Default, Clone)]
pub struct TokenStore {
    by_hash: HashMap<Hash, String>,
}

/// Tokens-file errors.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Syntax.
    #[error("tokens file line {line}: {msg}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// What.
        msg: String,
    },
}

impl TokenStore {
    /// Parses lines `source_id token`; `#` comments and blank lines ignored.
    /// A token may belong to one source only; a source may have several.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut by_hash = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(src), Some(tok), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(TokenError::Syntax {
                    line: i + 1,
                    msg: "expected `source_id token`".into(),
                });
            };
            if tok.len() < 16 {
                return Err(TokenError::Syntax {
                    line: i + 1,
                    msg: "token shorter than 16 characters".into(),
                });
            }
            let h: Hash = Sha256::digest(tok.as_bytes()).into();
            if by_hash.insert(h, src.to_owned()).is_some() {
                return Err(TokenError::Syntax {
                    line: i + 1,
                    msg: "token listed twice".into(),
                });
            }
        }
        Ok(Self { by_hash })
    }

    /// Reads a tokens file.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TokenError::Io(path.display().to_string(), e))?;
        Self::parse(&text)
    }

    /// Source id of a bearer token.
    pub fn source_for(&self, token: &str) -> Option<&str> {
        let h: Hash = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&h).map(String::as_str)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// No tokens (every Append is refused).
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct AuditService {
    shared: Arc<SharedLog>,
    tx: mpsc::Sender<Item>,
    tokens: Arc<TokenStore>,
    metrics: Arc<Metrics>,
}

impl AuditService {
    /// New service over a running sequencer.
    pub fn new(
        shared: Arc<SharedLog>,
        seq: &Sequencer,
        tokens: TokenStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared,
            tx: seq.sender(),
            tokens: Arc::new(tokens),
            metrics,
        }
    }

    fn authenticate<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let Some(v) = req.metadata().get("authorization") else {
            self.metrics.auth_failures.inc();
            return Err(Status::unauthenticated(
                "missing authorization: Bearer <token>",
            ));
        };
        let token = v
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("Bearer "))
            .map(str::trim);
        match token.and_then(|t| self.tokens.source_for(t)) {
            Some(src) => Ok(src.to_owned()),
            None => {
                self.metrics.auth_failures.inc();
                Err(Status::unauthenticated("invalid audit token"))
            }
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const ACK_WINDOW: usize = 8192;
const TAIL_CHUNK: u64 = 512;

#[tonic::async_trait]
impl Audit for AuditService {
    type AppendStream = BoxStream<AppendAck>;

    async fn append(
        &self,
        request: Request<Streaming<AuditRecord>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let source = self.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let (ack_tx, ack_rx) = mpsc::channel::<AckResult>(ACK_WINDOW);
        let tx = self.tx.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(_) => break, // client went away; queued records still get acked
                };
                let Ok(permit) = ack_tx.clone().reserve_owned().await else {
                    break;
                };
                if !msg.source_id.is_empty() && msg.source_id != source {
                    metrics.auth_failures.inc();
                    permit.send(Err(Status::permission_denied(format!(
                        "token is for source {source:?}, record claims {:?}",
                        msg.source_id
                    ))));
                    break;
                }
                let record = match encoding::validate_record(&msg) {
                    Ok(()) => Ok(msg),
                    Err(e) => Err((msg.source_id, msg.source_seq, e.to_string())),
                };
                if tx
                    .send(Item {
                        record,
                        reply: permit,
                    })
                    .await
                    .is_err()
                {
                    // Sequencer gone (shutdown or storage failure).
                    let _ = ack_tx
                        .send(Err(Status::unavailable("audit sequencer stopped")))
                        .await;
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(ack_rx),
        )))
    }

    async fn checkpoint(
        &self,
        _request: Request<CheckpointRequest>,
    ) -> Result<Response<SignedCheckpoint>, Status> {
        let latest = self.shared.state.read().latest_checkpoint();
        let (cp, note) = latest.ok_or_else(|| Status::unavailable("no checkpoint yet"))?;
        Ok(Response::new(SignedCheckpoint {
            size: cp.size,
            root_hash: cp.root.to_vec(),
            note: note.to_string(),
        }))
    }

    async fn prove(
        &self,
        request: Request<ProveRequest>,
    ) -> Result<Response<InclusionProof>, Status> {
        let req = request.into_inner();
        let (plan, proof) = {
            let st = self.shared.state.read();
            let (cp, note) = if req.tree_size == 0 {
                st.latest_checkpoint()
            } else {
                st.checkpoint_for_size(req.tree_size)
            }
            .ok_or_else(|| {
                Status::not_found(format!("no checkpoint of tree size {}", req.tree_size))
            })?;
            if req.index >= cp.size {
                return Err(Status::out_of_range(format!(
                    "index {} not covered by checkpoint of size {} (checkpoints are signed every second)",
                    req.index, cp.size
                )));
            }
            let path = st
                .tree()
                .inclusion_proof(req.index, cp.size)
                .map_err(|e| Status::internal(e.to_string()))?;
            let leaf = st
                .tree()
                .leaf(req.index)
                .ok_or_else(|| Status::internal("leaf missing"))?;
            let plan = st
                .plan_read(req.index, req.index + 1)
                .ok_or_else(|| Status::internal("entry missing"))?;
            (
                plan,
                InclusionProof {
                    index: req.index,
                    tree_size: cp.size,
                    leaf_hash: leaf.to_vec(),
                    path: path.iter().map(|h| h.to_vec()).collect(),
                    checkpoint_note: note.to_string(),
                    entry: Vec::new(),
                },
            )
        };
        let entries = tokio::task::spawn_blocking(move || plan.read())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let (_, entry) = entries
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("entry missing"))?;
        Ok(Response::new(InclusionProof { entry, ..proof }))
    }

    async fn consistency(
        &self,
        request: Request<ConsistencyRequest>,
    ) -> Result<Response<ConsistencyProof>, Status> {
        let req = request.into_inner();
        let st = self.shared.state.read();
        let to = if req.to_size == 0 {
            st.latest_checkpoint().map_or(0, |c| c.0.size)
        } else {
            req.to_size
        };
        let path = st
            .tree()
            .consistency_proof(req.from_size, to)
            .map_err(|e| Status::out_of_range(e.to_string()))?;
        Ok(Response::new(ConsistencyProof {
            from_size: req.from_size,
            to_size: to,
            path: path.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    type TailStream = BoxStream<TailEntry>;

    async fn tail(
        &self,
        request: Request<TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let req = request.into_inner();
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel::<Result<TailEntry, Status>>(1024);
        tokio::spawn(async move {
            let mut size_rx = shared.size_tx.subscribe();
            let mut next = req.from;
            loop {
                let plan = shared.state.read().plan_read(next, next + TAIL_CHUNK);
                let Some(plan) = plan else {
                    if !req.follow {
                        return;
                    }
                    tokio::select! {
                        r = size_rx.changed() => if r.is_err() { return },
                        () = tx.closed() => return,
                    }
                    continue;
                };
                let entries = match tokio::task::spawn_blocking(move || plan.read()).await {
                    Ok(Ok(e)) => e,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                for (index, bytes) in entries {
                    let msg = match encoding::decode_entry(&bytes) {
                        Ok(e) => Ok(TailEntry {
                            index,
                            source_id: e.source_id,
                            source_seq: e.source_seq,
                            finding: Some(e.finding),
                            entry_hash: crate::merkle::leaf_hash(&bytes).to_vec(),
                        }),
                        Err(e) => Err(Status::internal(format!("entry {index}: {e}"))),
                    };
                    let is_err = msg.is_err();
                    if tx.send(msg).await.is_err() || is_err {
                        return;
                    }
                    next = index + 1;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn rec(trace_parent: &str) -> AuditRecord {
        AuditRecord {
            source_id: "pep".into(),
            source_seq: 1,
            finding: None,
            trace_parent: trace_parent.into(),
        }
    }

    /// With an OpenTelemetry layer, a record's traceparent becomes the
    /// parent of its `audit.append` span; untraced or malformed ones get no
    /// span at all.
    #[test]
    fn append_span_continues_the_records_trace() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("audit-test")));
        let _g = tracing::subscriber::set_default(subscriber);
        let tp = "00-5ec0b5000000000000000000000a0d17-00f067aa0ba902b7-01";
        let span = append_span(&rec(tp)).expect("traced record gets a span");
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "5ec0b5000000000000000000000a0d17"
        );
        assert!(append_span(&rec("")).is_none());
        assert!(append_span(&rec("not-a-traceparent")).is_none());
        assert!(append_span(&rec(&"0".repeat(10_000))).is_none());
    }

    /// Without an OpenTelemetry layer (no exporter) nothing is linked.
    #[test]
    fn append_span_is_none_without_opentelemetry() {
        let _g = tracing::subscriber::set_default(tracing_subscriber::registry());
        let tp = "00-5ec0b5000000000000000000000a0d17-00f067aa0ba902b7-01";
        assert!(append_span(&rec(tp)).is_none());
    }
}
