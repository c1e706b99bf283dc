//! Client helpers for `Prove` and `Tail` (used by `secureops audit prove|tail`
//! and by `secureops-audit prove`).

use crate::encoding::{self, Entry, Hash};
use crate::merkle;
use crate::note::{Checkpoint, NoteVerifier};
use secureops_proto::v1::audit_client::AuditClient;
use secureops_proto::v1::{InclusionProof, ProveRequest, TailEntry, TailRequest};
use std::time::Duration;
use tonic::transport::Channel;

/// Client-side errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("connect {0}: {1}")]
    Connect(String, String),
    /// The RPC failed.
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
    /// The proof does not verify.
    #[error("proof does not verify: {0}")]
    BadProof(String),
}

/// Connects to an audit server (`host:port` or a URL).
pub async fn connect(addr: &str) -> Result<AuditClient<Channel>, ClientError> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let ep = Channel::from_shared(url.clone())
        .map_err(|e| ClientError::Connect(url.clone(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let ch = ep
        .connect()
        .await
        .map_err(|e| ClientError::Connect(url, e.to_string()))?;
    Ok(AuditClient::new(ch))
}

/// An entry with a verified inclusion proof.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProvenEntry {
    /// Log index.
    pub index: u64,
    /// Tree size of the checkpoint.
    pub tree_size: u64,
    /// Checkpoint root, hex.
    pub root: String,
    /// Leaf hash, hex.
    pub leaf_hash: String,
    /// Audit path, hex, bottom-up.
    pub path: Vec<String>,
    /// The signed checkpoint note.
    pub checkpoint_note: String,
    /// Whether the checkpoint signature was checked against a given key.
    pub signature_verified: bool,
    /// Source of the record.
    pub source_id: String,
    /// Per-source sequence number.
    pub source_seq: u64,
    /// Sequencer time.
    pub log_time_unix_nanos: u64,
    /// The record, as protobuf-JSON-like debug text.
    pub finding: String,
}

fn to_hash(b: &[u8], what: &str) -> Result<Hash, ClientError> {
    b.try_into()
        .map_err(|_| ClientError::BadProof(format!("{what} is not 32 bytes")))
}

/// Verifies an `InclusionProof` offline: the entry decodes canonically and
/// has the claimed index, its leaf hash matches, the audit path leads to the
/// checkpoint's root, and (when `key` is given) the checkpoint is signed by
/// `key`.
pub fn verify_inclusion_proof(
    p: &InclusionProof,
    key: Option<&NoteVerifier>,
) -> Result<(ProvenEntry, Entry, Checkpoint), ClientError> {
    let cp = match key {
        Some(k) => Checkpoint::open(&p.checkpoint_note, k)
            .map_err(|e| ClientError::BadProof(format!("checkpoint: {e}")))?,
        None => Checkpoint::parse_unverified(&p.checkpoint_note)
            .map_err(|e| ClientError::BadProof(format!("checkpoint: {e}")))?,
    };
    if cp.size != p.tree_size {
        return Err(ClientError::BadProof(
            "tree size differs from the checkpoint".into(),
        ));
    }
    let entry = encoding::decode_entry(&p.entry)
        .map_err(|e| ClientError::BadProof(format!("entry: {e}")))?;
    if entry.index != p.index {
        return Err(ClientError::BadProof(format!(
            "entry has index {}, proof is for {}",
            entry.index, p.index
        )));
    }
    let leaf = merkle::leaf_hash(&p.entry);
    if leaf.as_slice() != p.leaf_hash.as_slice() {
        return Err(ClientError::BadProof("leaf hash differs from entry".into()));
    }
    let path = p
        .path
        .iter()
        .map(|h| to_hash(h, "path element"))
        .collect::<Result<Vec<_>, _>>()?;
    if !merkle::verify_inclusion(&leaf, p.index, p.tree_size, &path, &cp.root) {
        return Err(ClientError::BadProof(
            "audit path does not lead to the checkpoint root".into(),
        ));
    }
    let proven = ProvenEntry {
        index: p.index,
        tree_size: p.tree_size,
        root: hex::encode(cp.root),
        leaf_hash: hex::encode(leaf),
        path: path.iter().map(hex::encode).collect(),
        checkpoint_note: p.checkpoint_note.clone(),
        signature_verified: key.is_some(),
        source_id: entry.source_id.clone(),
        source_seq: entry.source_seq,
        log_time_unix_nanos: entry.log_time_unix_nanos,
        finding: format!("{:?}", entry.finding),
    };
    Ok((proven, entry, cp))
}

/// Fetches the inclusion proof of `index` against the latest checkpoint and
/// verifies it locally. A fresh entry may not be checkpointed yet (one
/// checkpoint per second), so OUT_OF_RANGE is retried for up to `wait`.
pub async fn prove(
    addr: &str,
    index: u64,
    key: Option<&NoteVerifier>,
    wait: Duration,
) -> Result<ProvenEntry, ClientError> {
    let mut c = connect(addr).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let proof = loop {
        match c
            .prove(ProveRequest {
                index,
                tree_size: 0,
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::OutOfRange
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => return Err(s.into()),
        }
    };
    Ok(verify_inclusion_proof(&proof, key)?.0)
}

/// Opens a `Tail` stream from `from`; with `follow` it stays open and yields
/// new entries as they become durable.
pub async fn tail(
    addr: &str,
    from: u64,
    follow: bool,
) -> Result<tonic::Streaming<TailEntry>, ClientError> {
    let mut c = connect(addr).await?;
    Ok(c.tail(TailRequest { from, follow }).await?.into_inner())
}

/// Fetches the latest signed checkpoint; with `key`, checks its signature.
pub async fn latest_checkpoint(
    addr: &str,
    key: Option<&NoteVerifier>,
) -> Result<(Checkpoint, String), ClientError> {
    let mut c = connect(addr).await?;
    let s = c
        .checkpoint(secureops_proto::v1::CheckpointRequest {})
        .await?
        .into_inner();
    let cp = match key {
        Some(k) => Checkpoint::open(&s.note, k),
        None => Checkpoint::parse_unverified(&s.note),
    }
    .map_err(|e| ClientError::BadProof(format!("checkpoint: {e}")))?;
    if cp.size != s.size || cp.root.as_slice() != s.root_hash.as_slice() {
        return Err(ClientError::BadProof(
            "checkpoint fields differ from its note".into(),
        ));
    }
    Ok((cp, s.note))
}

/// Witness check: is the server's latest checkpoint an append-only extension
/// of `trusted_note` (a checkpoint saved earlier)? Both must be signed by
/// `key`; the RFC 6962 consistency proof is fetched and verified locally.
/// Returns (trusted, latest).
pub async fn check_consistency(
    addr: &str,
    trusted_note: &str,
    key: &NoteVerifier,
) -> Result<(Checkpoint, Checkpoint), ClientError> {
    let old = Checkpoint::open(trusted_note, key)
        .map_err(|e| ClientError::BadProof(format!("trusted checkpoint: {e}")))?;
    let (new, _) = latest_checkpoint(addr, Some(key)).await?;
    if new.size < old.size {
        return Err(ClientError::BadProof(format!(
            "log shrank from {} to {} entries",
            old.size, new.size
        )));
    }
    let mut c = connect(addr).await?;
    let p = c
        .consistency(secureops_proto::v1::ConsistencyRequest {
            from_size: old.size,
            to_size: new.size,
        })
        .await?
        .into_inner();
    let path = p
        .path
        .iter()
        .map(|h| to_hash(h, "proof element"))
        .collect::<Result<Vec<_>, _>>()?;
    if !merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &path) {
        return Err(ClientError::BadProof(format!(
            "checkpoint of size {} is not a prefix of the log at size {}",
            old.size, new.size
        )));
    }
    Ok((old, new))
}
