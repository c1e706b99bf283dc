//! Which paths are sensitive: a compiled [`globset::GlobSet`] over absolute
//! paths.
//!
//! Why `literal_separator(true)`: `*` must stay inside one path component,
//! otherwise `**/.env*` would also match every file under a directory called
//! `.envoy/`; `**` still crosses directories.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Default sensitive path globs (documented in the crate docs and `--help`).
///
/// They cover the credential files an injected agent is most likely to read
/// before exfiltrating them: dotenv files, cloud CLIs (AWS, gcloud, Azure,
/// Docker, Kubernetes), SSH private keys and package-registry tokens.
pub const DEFAULT_SENSITIVE_GLOBS: &[&str] = &[
    "**/.env*",
    "**/.aws/credentials",
    "**/.aws/config",
    "**/.ssh/id_*",
    "**/.netrc",
    "**/.git-credentials",
    "**/.npmrc",
    "**/.pypirc",
    "**/.docker/config.json",
    "**/.kube/config",
    "**/.config/gcloud/**/credentials*",
    "**/.config/gcloud/**/application_default_credentials.json",
    "**/.config/gcloud/**/access_tokens.db",
    "**/.azure/accessTokens.json",
    "**/.azure/msal_token_cache.*",
    "**/.azure/service_principal_entries.json",
];

/// How `--watch` globs combine with the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatchMode {
    /// Defaults plus the `--watch` globs.
    #[default]
    Extend,
    /// Only the `--watch` globs.
    Replace,
}

impl std::str::FromStr for WatchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "extend" => Ok(WatchMode::Extend),
            "replace" => Ok(WatchMode::Replace),
            other => Err(format!(
                "unknown watch mode {other:?} (expected extend|replace)"
            )),
        }
    }
}

/// Errors building the sensitive-path matcher.
#[derive(Debug, thiserror::Error)]
pub enum GlobError {
    #[error("invalid glob {glob:?}: {source}")]
    Invalid {
        glob: String,
        #[source]
        source: globset::Error,
    },
    #[error("no sensitive globs configured (--watch-mode replace needs at least one --watch)")]
    Empty,
}

/// Compiled set of sensitive path globs.
#[derive(Debug, Clone)]
pub struct SensitiveMatcher {
    set: GlobSet,
    globs: Vec<String>,
}

impl SensitiveMatcher {
    /// Build from the defaults and/or the operator's `--watch` globs.
    pub fn new(extra: &[String], mode: WatchMode) -> Result<Self, GlobError> {
        let mut globs: Vec<String> = match mode {
            WatchMode::Extend => DEFAULT_SENSITIVE_GLOBS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            WatchMode::Replace => Vec::new(),
        };
        for g in extra {
            let g = g.trim();
            if !g.is_empty() && !globs.iter().any(|x| x == g) {
                globs.push(g.to_string());
            }
        }
        if globs.is_empty() {
            return Err(GlobError::Empty);
        }
        let mut b = GlobSetBuilder::new();
        for g in &globs {
            let glob = GlobBuilder::new(g)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|source| GlobError::Invalid {
                    glob: g.clone(),
                    source,
                })?;
            b.add(glob);
        }
        let set = b.build().map_err(|source| GlobError::Invalid {
            glob: globs.join(","),
            source,
        })?;
        Ok(Self { set, globs })
    }

    /// Whether an absolute path (as resolved from the event fd) is sensitive.
    ///
    /// A path the kernel reports for an unlinked file carries a
    /// ` (deleted)` suffix; it is matched without it so that opening a
    /// credential file that was just deleted still counts.
    pub fn is_sensitive(&self, path: &str) -> bool {
        let p = path.strip_suffix(" (deleted)").unwrap_or(path);
        self.set.is_match(p)
    }

    /// The globs in effect (for the startup log).
    pub fn globs(&self) -> &[String] {
        &self.globs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> SensitiveMatcher {
        SensitiveMatcher::new(&[], WatchMode::Extend).unwrap()
    }

    #[test]
    fn default_globs_match_credentials() {
        let m = defaults();
        for p in [
            "/work/app/.env",
            "/work/app/.env.local",
            "/tmp/x/.envrc",
            "/home/u/.aws/credentials",
            "/root/.aws/config",
            "/home/u/.ssh/id_ed25519",
            "/home/u/.ssh/id_rsa",
            "/home/u/.netrc",
            "/home/u/.git-credentials",
            "/home/u/.npmrc",
            "/home/u/.pypirc",
            "/home/u/.docker/config.json",
            "/home/u/.kube/config",
            "/home/u/.config/gcloud/legacy_credentials/me@x.com/adc.json/credentials",
            "/home/u/.config/gcloud/credentials.db",
            "/home/u/.config/gcloud/application_default_credentials.json",
            "/home/u/.config/gcloud/access_tokens.db",
            "/home/u/.azure/accessTokens.json",
            "/home/u/.azure/msal_token_cache.json",
            "/home/u/.azure/service_principal_entries.json",
            "/work/app/.env (deleted)",
        ] {
            assert!(m.is_sensitive(p), "{p} should be sensitive");
        }
    }

    #[test]
    fn default_globs_ignore_ordinary_files() {
        let m = defaults();
        for p in [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/work/app/src/main.rs",
            "/work/app/.envoy/config.yaml",
            "/work/app/env",
            "/home/u/.aws/cli/cache/x.json",
            "/home/u/.ssh/known_hosts",
            "/home/u/.ssh/config",
            "/home/u/.kube/cache/discovery",
            "/home/u/.docker/buildx/instances",
            "/home/u/.azure/az.json",
        ] {
            assert!(!m.is_sensitive(p), "{p} should not be sensitive");
        }
    }

    #[test]
    fn watch_extends_or_replaces() {
        let extra = vec!["**/secrets/*.key".to_string()];
        let m = SensitiveMatcher::new(&extra, WatchMode::Extend).unwrap();
        assert!(m.is_sensitive("/srv/secrets/tls.key"));
        assert!(m.is_sensitive("/srv/.env"));
        let m = SensitiveMatcher::new(&extra, WatchMode::Replace).unwrap();
        assert!(m.is_sensitive("/srv/secrets/tls.key"));
        assert!(!m.is_sensitive("/srv/.env"));
        assert!(matches!(
            SensitiveMatcher::new(&[], WatchMode::Replace),
            Err(GlobError::Empty)
        ));
        assert!(matches!(
            SensitiveMatcher::new(&["a/[".to_string()], WatchMode::Extend),
            Err(GlobError::Invalid { .. })
        ));
    }
}
