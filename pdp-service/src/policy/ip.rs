//! Special-purpose IP classification, including IPv4 embeddings in IPv6.

use std::net::IpAddr;

/// A special-purpose address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialRange {
    /// 127.0.0.0/8, ::1
    Loopback,
}

/// Classify `ip`; `None` for ordinary public unicast.
pub fn classify_ip(ip: IpAddr) -> Option<SpecialRange> {
    if ip.is_loopback() {
        Some(SpecialRange::Loopback)
    } else {
        None
    }
}
