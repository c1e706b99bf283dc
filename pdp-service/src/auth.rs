//! Bearer-token authentication of the admin listener.
//!
//! The token is compared in constant time over SHA-256 digests of both
//! sides, so neither content nor length of the expected token leaks through
//! timing.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Interceptor that requires `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuth {
    digest: [u8; 32],
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(..)")
    }
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Constant-time equality of two digests.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // black_box keeps the optimiser from short-circuiting the fold.
    std::hint::black_box(diff) == 0
}

impl BearerAuth {
    /// Accept exactly `token`.
    pub fn new(token: &str) -> Self {
        BearerAuth {
            digest: digest(token.as_bytes()),
        }
    }

    /// Check a raw `authorization` header value.
    pub fn verify(&self, header: Option<&[u8]>) -> Result<(), Status> {
        let Some(h) = header else {
            return Err(Status::unauthenticated(
                "missing authorization: Bearer <token>",
            ));
        };
        let Some(tok) = h
            .strip_prefix(b"Bearer ")
            .or_else(|| h.strip_prefix(b"bearer "))
        else {
            return Err(Status::unauthenticated(
                "authorization must be `Bearer <token>`",
            ));
        };
        if ct_eq(&self.digest, &digest(tok)) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid admin token"))
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let res = self.verify(req.metadata().get("authorization").map(|v| v.as_bytes()));
        if let Err(e) = &res {
            tracing::warn!(error = %e.message(), "admin request refused");
        }
        res.map(|()| req)
    }
}

/// Errors loading or creating the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The token file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no token.
    #[error("{0}: token file is empty")]
    Empty(PathBuf),
}

/// Read the token from `file` (surrounding whitespace trimmed).
pub fn read_token(file: &Path) -> Result<String, TokenError> {
    let raw = fs::read_to_string(file).map_err(|source| TokenError::Io {
        path: file.to_owned(),
        source,
    })?;
    let t = raw.trim();
    if t.is_empty() {
        return Err(TokenError::Empty(file.to_owned()));
    }
    Ok(t.to_owned())
}

/// Load `<data_dir>/admin.token`, creating it (32 random bytes, hex, mode
/// 0600) when absent. Returns the token and the file path.
pub fn load_or_create_token(data_dir: &Path) -> Result<(String, PathBuf), TokenError> {
    let path = data_dir.join("admin.token");
    if path.exists() {
        return read_token(&path).map(|t| (t, path));
    }
    let io = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(data_dir).map_err(io)?;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let token = hex::encode(b);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path).map_err(io)?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok((token, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_only_the_token() {
        let a = BearerAuth::new("s3cret");
        assert!(a.verify(Some(b"Bearer s3cret")).is_ok());
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret ",
            b"s3cret",
            b"Basic s3cret",
            b"Bearer ",
        ] {
            let e = a.verify(Some(bad));
            assert_eq!(e.map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        }
        assert!(a.verify(None).is_err());
    }

    #[test]
    fn generated_token_is_private() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        let (t, p) = load_or_create_token(d.path())?;
        assert_eq!(t.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&p)?.permissions().mode() & 0o777, 0o600);
        }
        let (t2, _) = load_or_create_token(d.path())?;
        assert_eq!(t, t2);
        Ok(())
    }
}
