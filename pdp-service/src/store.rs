//! Versioned, durable policy storage under `<data-dir>/policies/`.
//!
//! Every accepted version is written as `<version>.yaml` (the exact text) and
//! `<version>.json` (metadata incl. the SHA-256 of the text). Each file is
//! written to a temporary name, fsynced, renamed into place, and the
//! directory is fsynced, so a crash leaves either the complete version or
//! nothing. The metadata file is written last and is the commit marker: a
//! YAML file without metadata (crash in between) is ignored on load.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Metadata of one stored policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// Version number (1, 2, ...; 0 is the built-in deny-everything policy,
    /// never stored).
    pub version: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: i64,
    /// Who put it.
    pub author: String,
    /// Why.
    pub comment: String,
    /// Hex SHA-256 of the YAML text.
    pub sha256: String,
}

/// Errors of the policy store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Corrupt metadata or text.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No such version.
    #[error("policy version {0} not found")]
    NotFound(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Hex SHA-256 of a policy text.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Current time in ms since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The on-disk version store.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    /// Every stored version, ascending.
    history: Vec<VersionMeta>,
}

/// Write `data` to `path` atomically: temp file in the same directory,
/// fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

impl PolicyStore {
    /// Open (creating) `<data_dir>/policies` and load the metadata of every
    /// complete version. Corrupt versions are skipped with a warning.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("policies");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut history = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(version) = stem.parse::<u64>() else {
                continue;
            };
            match Self::load_meta(&dir, version) {
                Ok(m) => history.push(m),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable policy version"),
            }
        }
        history.sort_by_key(|m| m.version);
        Ok(PolicyStore { dir, history })
    }

    fn load_meta(dir: &Path, version: u64) -> Result<VersionMeta, StoreError> {
        let path = dir.join(format!("{version}.json"));
        let raw = fs::read(&path).map_err(io(&path))?;
        let meta: VersionMeta = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if meta.version != version {
            return Err(StoreError::Corrupt {
                path,
                message: format!("metadata says version {}", meta.version),
            });
        }
        Ok(meta)
    }

    /// Directory holding the versions.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every stored version, ascending.
    pub fn history(&self) -> &[VersionMeta] {
        &self.history
    }

    /// Highest stored version (0 when empty).
    pub fn latest_version(&self) -> u64 {
        self.history.last().map_or(0, |m| m.version)
    }

    /// Metadata of one version.
    pub fn meta(&self, version: u64) -> Option<&VersionMeta> {
        self.history
            .binary_search_by_key(&version, |m| m.version)
            .ok()
            .and_then(|i| self.history.get(i))
    }

    /// Read the text of a stored version, verifying its checksum.
    pub fn read(&self, version: u64) -> Result<String, StoreError> {
        let meta = self.meta(version).ok_or(StoreError::NotFound(version))?;
        let path = self.dir.join(format!("{version}.yaml"));
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        if sha256_hex(&text) != meta.sha256 {
            return Err(StoreError::Corrupt {
                path,
                message: "SHA-256 mismatch".into(),
            });
        }
        Ok(text)
    }

    /// Durably store `yaml` as version `latest + 1`.
    pub fn append(
        &mut self,
        yaml: &str,
        author: &str,
        comment: &str,
    ) -> Result<VersionMeta, StoreError> {
        let version = self.latest_version() + 1;
        let meta = VersionMeta {
            version,
            created_unix_ms: now_unix_ms(),
            author: author.to_owned(),
            comment: comment.to_owned(),
            sha256: sha256_hex(yaml),
        };
        write_atomic(&self.dir.join(format!("{version}.yaml")), yaml.as_bytes())?;
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| StoreError::Corrupt {
            path: self.dir.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&self.dir.join(format!("{version}.json")), &json)?;
        self.history.push(meta.clone());
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_reload_and_checksum() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        let mut s = PolicyStore::open(d.path())?;
        assert_eq!(s.latest_version(), 0);
        let m1 = s.append("version: 1\n", "a", "first")?;
        let m2 = s.append("version: 1\ndefault: deny\n", "b", "second")?;
        assert_eq!((m1.version, m2.version), (1, 2));
        // A torn write (yaml without metadata) is ignored.
        fs::write(s.dir().join("3.yaml"), "garbage")?;
        let s2 = PolicyStore::open(d.path())?;
        assert_eq!(s2.latest_version(), 2);
        assert_eq!(s2.read(1)?, "version: 1\n");
        assert_eq!(s2.meta(2).map(|m| m.author.as_str()), Some("b"));
        fs::write(s2.dir().join("1.yaml"), "tampered")?;
        assert!(matches!(s2.read(1), Err(StoreError::Corrupt { .. })));
        assert!(matches!(s2.read(9), Err(StoreError::NotFound(9))));
        Ok(())
    }
}
