//! C2SP signed notes (`signed-note`) carrying C2SP `tlog-checkpoint` bodies,
//! signed with Ed25519, and the key file formats.
//!
//! Key formats (the same as Go's `golang.org/x/mod/sumdb/note`):
//!
//! * key id: the first 4 bytes (big-endian `u32`) of
//!   `SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public_key)`;
//! * verifier key ("vkey", public, e.g. `audit.pub`):
//!   `<name>+<key id as 8 lowercase hex digits>+<base64(0x01 ‖ 32-byte public key)>`;
//! * signer key ("skey", private, file mode 0600, e.g. `audit.key`):
//!   `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 ‖ 32-byte Ed25519 seed)>`.
//!
//! A key name is non-empty and contains no `+` and no whitespace. Base64 is the
//! standard alphabet with padding. Trailing whitespace in key files is ignored.
//!
//! Checkpoint note:
//!
//! ```text
//! <origin>\n
//! <tree size, decimal>\n
//! <base64 of the 32-byte RFC 6962 root hash>\n
//! time <unix nanoseconds when signed>\n        (extension line)
//! \n
//! — <key name> <base64(key id (4 bytes) ‖ Ed25519 signature (64 bytes))>\n
//! ```
//!
//! The signature covers the body: every byte up to and including the newline
//! before the blank line. Signature lines from unknown keys are ignored; a
//! note is accepted only if it carries a valid signature by the expected key.

use crate::encoding::Hash;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, Verifier};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

const ALG_ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";

/// Errors of keys and notes.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    /// Key text does not follow the format.
    #[error("malformed key: {0}")]
    Key(String),
    /// Note text does not follow the format.
    #[error("malformed note: {0}")]
    Malformed(String),
    /// No signature line by the expected key.
    #[error("note has no signature by key {0}")]
    MissingSignature(String),
    /// A signature line by the expected key does not verify.
    #[error("invalid signature by key {0}")]
    BadSignature(String),
    /// Key file I/O.
    #[error("key file {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('+') && !name.chars().any(char::is_whitespace)
}

/// C2SP signed-note key id for an Ed25519 key.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public_key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Private signing key with its name.
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    key: ed25519_dalek::SigningKey,
    id: u32,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteSigner({}+{:08x})", self.name, self.id)
    }
}

impl NoteSigner {
    /// Fresh random key.
    pub fn generate(name: &str) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key(format!("invalid key name {name:?}")));
        }
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Ok(Self::from_parts(name, key))
    }

    fn from_parts(name: &str, key: ed25519_dalek::SigningKey) -> Self {
        let id = key_id(name, key.verifying_key().as_bytes());
        Self {
            name: name.to_owned(),
            key,
            id,
        }
    }

    /// Parses `PRIVATE+KEY+<name>+<hash>+<base64>`.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let text = text.trim();
        let rest = text
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| NoteError::Key("missing PRIVATE+KEY+ prefix".into()))?;
        let (name, id, raw) = split_key(rest)?;
        let seed: [u8; 32] = raw
            .try_into()
            .map_err(|_| NoteError::Key("Ed25519 seed must be 32 bytes".into()))?;
        let s = Self::from_parts(&name, ed25519_dalek::SigningKey::from_bytes(&seed));
        if s.id != id {
            return Err(NoteError::Key("key id does not match key".into()));
        }
        Ok(s)
    }

    /// `PRIVATE+KEY+<name>+<hash>+<base64>`.
    pub fn to_skey(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(&self.key.to_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            B64.encode(raw)
        )
    }

    /// Key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching verifier key.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key: self.key.verifying_key(),
            id: self.id,
        }
    }

    /// Signs a note body (must end with a newline), returning the whole note.
    pub fn sign_note(&self, body: &str) -> String {
        let sig = self.key.sign(body.as_bytes());
        let mut raw = self.id.to_be_bytes().to_vec();
        raw.extend_from_slice(&sig.to_bytes());
        format!("{body}\n{SIG_PREFIX}{} {}\n", self.name, B64.encode(raw))
    }
}

fn split_key(s: &str) -> Result<(String, u32, Vec<u8>), NoteError> {
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(hash), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NoteError::Key("expected name+hash+key".into()));
    };
    if !valid_name(name) {
        return Err(NoteError::Key(format!("invalid key name {name:?}")));
    }
    if hash.len() != 8 {
        return Err(NoteError::Key("key hash must be 8 hex digits".into()));
    }
    let id = u32::from_str_radix(hash, 16).map_err(|_| NoteError::Key("bad key hash".into()))?;
    let raw = B64
        .decode(b64)
        .map_err(|e| NoteError::Key(format!("bad base64: {e}")))?;
    match raw.split_first() {
        Some((&ALG_ED25519, key)) => Ok((name.to_owned(), id, key.to_vec())),
        _ => Err(NoteError::Key(
            "unsupported key algorithm (want Ed25519)".into(),
        )),
    }
}

/// Public verifier key with its name and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key: ed25519_dalek::VerifyingKey,
    id: u32,
}

impl NoteVerifier {
    /// Parses `<name>+<hash>+<base64>`.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let (name, id, raw) = split_key(text.trim())?;
        let pk: [u8; 32] = raw
            .try_into()
            .map_err(|_| NoteError::Key("Ed25519 public key must be 32 bytes".into()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk)
            .map_err(|e| NoteError::Key(format!("invalid Ed25519 public key: {e}")))?;
        if key_id(&name, &pk) != id {
            return Err(NoteError::Key("key id does not match key".into()));
        }
        Ok(Self { name, key, id })
    }

    /// Reads a vkey file.
    pub fn from_file(path: &Path) -> Result<Self, NoteError> {
        let text = std::fs::read_to_string(path).map_err(|source| NoteError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// `<name>+<hash>+<base64>`.
    pub fn to_vkey(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }

    /// Key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Key id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Verifies a signed note; returns its body (ending in a newline).
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| NoteError::Malformed("no blank line before signatures".into()))?;
        let body = &note[..split + 1];
        let sigs = &note[split + 2..];
        if !sigs.ends_with('\n') || sigs.is_empty() {
            return Err(NoteError::Malformed(
                "signature block must end in a newline".into(),
            ));
        }
        let mut found = false;
        for line in sigs[..sigs.len() - 1].split('\n') {
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or_else(|| NoteError::Malformed(format!("bad signature line {line:?}")))?;
            let (name, b64) = rest
                .split_once(' ')
                .ok_or_else(|| NoteError::Malformed(format!("bad signature line {line:?}")))?;
            let raw = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed("bad signature base64".into()))?;
            if raw.len() < 4 {
                return Err(NoteError::Malformed("signature too short".into()));
            }
            let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if name != self.name || id != self.id {
                continue; // another key's signature (e.g. a witness): ignored
            }
            let sig = ed25519_dalek::Signature::from_slice(&raw[4..])
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            self.key
                .verify(body.as_bytes(), &sig)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            found = true;
        }
        if found {
            Ok(body)
        } else {
            Err(NoteError::MissingSignature(format!(
                "{}+{:08x}",
                self.name, self.id
            )))
        }
    }
}

/// A parsed tlog-checkpoint body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Log name.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// RFC 6962 root hash of the first `size` entries.
    pub root: Hash,
    /// When it was signed (the `time` extension line), Unix nanoseconds.
    pub time_unix_nanos: u64,
}

impl Checkpoint {
    /// The note body text.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\ntime {}\n",
            self.origin,
            self.size,
            B64.encode(self.root),
            self.time_unix_nanos
        )
    }

    /// Signed note.
    pub fn sign(&self, signer: &NoteSigner) -> String {
        signer.sign_note(&self.body())
    }

    /// Parses a checkpoint body (no signature check).
    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let bad = |m: &str| NoteError::Malformed(m.to_owned());
        let lines: Vec<&str> = body
            .strip_suffix('\n')
            .ok_or_else(|| bad("body must end in a newline"))?
            .split('\n')
            .collect();
        if lines.len() < 3 {
            return Err(bad("checkpoint needs origin, size and root lines"));
        }
        let origin = lines[0];
        if origin.is_empty() {
            return Err(bad("empty origin"));
        }
        let size_line = lines[1];
        if size_line.is_empty()
            || !size_line.bytes().all(|b| b.is_ascii_digit())
            || (size_line.len() > 1 && size_line.starts_with('0'))
        {
            return Err(bad("tree size must be a canonical decimal"));
        }
        let size: u64 = size_line.parse().map_err(|_| bad("tree size overflow"))?;
        let root: Hash = B64
            .decode(lines[2])
            .map_err(|_| bad("root is not base64"))?
            .try_into()
            .map_err(|_| bad("root must be 32 bytes"))?;
        let mut time = None;
        for ext in &lines[3..] {
            if ext.is_empty() {
                return Err(bad("empty extension line"));
            }
            if let Some(t) = ext.strip_prefix("time ") {
                time = Some(t.parse().map_err(|_| bad("bad time extension"))?);
            }
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
            time_unix_nanos: time.ok_or_else(|| bad("missing time extension line"))?,
        })
    }

    /// Verifies the note's signature with `key` and parses the checkpoint.
    pub fn open(note: &str, key: &NoteVerifier) -> Result<Self, NoteError> {
        Self::parse_body(key.open(note)?)
    }

    /// Parses a note's checkpoint without checking signatures.
    pub fn parse_unverified(note: &str) -> Result<Self, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| NoteError::Malformed("no blank line before signatures".into()))?;
        Self::parse_body(&note[..split + 1])
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NoteError + '_ {
    move |source| NoteError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Loads the signing key at `path`, or, when it does not exist and
/// `generate` is set, creates a new one named `name` (file mode 0600, created
/// exclusively) and writes its vkey next to it as `<path>.pub`.
/// Returns the key and whether it was generated.
pub fn load_or_generate_key(
    path: &Path,
    name: &str,
    generate: bool,
) -> Result<(NoteSigner, bool), NoteError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((NoteSigner::parse(&text)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
            let key = NoteSigner::generate(name)?;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err(path))?;
            f.write_all(format!("{}\n", key.to_skey()).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_err(path))?;
            let pub_path = public_key_path(path);
            std::fs::write(&pub_path, format!("{}\n", key.verifier().to_vkey()))
                .map_err(io_err(&pub_path))?;
            Ok((key, true))
        }
        Err(e) => Err(NoteError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// `<key path>.pub`.
pub fn public_key_path(key_path: &Path) -> std::path::PathBuf {
    let mut s = key_path.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_open_roundtrip_and_key_formats() {
        let k = NoteSigner::generate("example.com/log").unwrap();
        let k2 = NoteSigner::parse(&k.to_skey()).unwrap();
        assert_eq!(k2.verifier(), k.verifier());
        let v = NoteVerifier::parse(&k.verifier().to_vkey()).unwrap();
        let cp = Checkpoint {
            origin: "example.com/log".into(),
            size: 12,
            root: [7; 32],
            time_unix_nanos: 5,
        };
        let note = cp.sign(&k);
        assert_eq!(Checkpoint::open(&note, &v).unwrap(), cp);
        // Forged: body changed.
        let forged = note.replace("\n12\n", "\n13\n");
        assert!(matches!(
            Checkpoint::open(&forged, &v),
            Err(NoteError::BadSignature(_))
        ));
        // Foreign key.
        let other = NoteSigner::generate("example.com/log").unwrap();
        assert!(matches!(
            Checkpoint::open(&cp.sign(&other), &v),
            Err(NoteError::MissingSignature(_))
        ));
    }

    #[test]
    fn key_id_matches_go_note_vector() {
        // Vector from golang.org/x/mod/sumdb/note (note_test.go).
        let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let v = NoteVerifier::parse(vkey).unwrap();
        assert_eq!(v.id(), 0xc74f20a3);
        assert_eq!(v.to_vkey(), vkey);
        let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        let s = NoteSigner::parse(skey).unwrap();
        assert_eq!(s.verifier().to_vkey(), vkey);
        // The Go test's signed note must verify.
        let text = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
        let note = format!(
            "{text}\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
        );
        assert_eq!(v.open(&note).unwrap(), text);
    }
}
