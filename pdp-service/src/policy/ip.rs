//! Longest-prefix CIDR tables. The special-purpose classifier itself lives
//! in `secureops_pep::special_ip`, shared with the PEPs.

use std::net::IpAddr;

use super::fxhash::FxHashMap;

/// A set of CIDR prefixes with payloads, answering "which payloads belong
/// to prefixes containing this address" with one hash probe per distinct
/// prefix length (at most 33 for IPv4, 129 for IPv6; in practice a handful).
#[derive(Debug)]
pub(crate) struct CidrTable<T> {
    v4: Vec<(u8, FxHashMap<u32, Vec<T>>)>,
    v6: Vec<(u8, FxHashMap<u128, Vec<T>>)>,
}

impl<T> Default for CidrTable<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(v: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        v & (u32::MAX << (32 - len))
    }
}

fn mask6(v: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        v & (u128::MAX << (128 - len))
    }
}

impl<T> CidrTable<T> {
    pub(crate) fn insert(&mut self, net: ipnet::IpNet, value: T) {
        match net {
            ipnet::IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = mask4(u32::from(n.network()), len);
                let slot = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(i) => i,
                    None => {
                        self.v4.push((len, FxHashMap::default()));
                        self.v4.sort_by_key(|e| std::cmp::Reverse(e.0));
                        self.v4.iter().position(|(l, _)| *l == len).unwrap_or(0)
                    }
                };
                self.v4[slot].1.entry(key).or_default().push(value);
            }
            ipnet::IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = mask6(u128::from(n.network()), len);
                let slot = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(i) => i,
                    None => {
                        self.v6.push((len, FxHashMap::default()));
                        self.v6.sort_by_key(|e| std::cmp::Reverse(e.0));
                        self.v6.iter().position(|(l, _)| *l == len).unwrap_or(0)
                    }
                };
                self.v6[slot].1.entry(key).or_default().push(value);
            }
        }
    }

    /// Visit every payload whose prefix contains `ip`, longest prefix first.
    pub(crate) fn for_each_containing(&self, ip: IpAddr, mut f: impl FnMut(&T)) {
        match ip {
            IpAddr::V4(a) => {
                let v = u32::from(a);
                for (len, map) in &self.v4 {
                    if let Some(vals) = map.get(&mask4(v, *len)) {
                        vals.iter().for_each(&mut f);
                    }
                }
            }
            IpAddr::V6(a) => {
                let v = u128::from(a);
                for (len, map) in &self.v6 {
                    if let Some(vals) = map.get(&mask6(v, *len)) {
                        vals.iter().for_each(&mut f);
                    }
                }
            }
        }
    }

    /// True when some prefix contains `ip`.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let mut hit = false;
        self.for_each_containing(ip, |_| hit = true);
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_table() {
        let mut t = CidrTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        t.insert("10.1.0.0/16".parse().unwrap(), 2);
        t.insert("0.0.0.0/0".parse().unwrap(), 3);
        t.insert("2001:db8::/32".parse().unwrap(), 4);
        let mut got = vec![];
        t.for_each_containing("10.1.2.3".parse().unwrap(), |v| got.push(*v));
        assert_eq!(got, vec![2, 1, 3]);
        got.clear();
        t.for_each_containing("11.0.0.1".parse().unwrap(), |v| got.push(*v));
        assert_eq!(got, vec![3]);
        assert!(t.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!t.contains("2001:db9::1".parse().unwrap()));
    }
}
