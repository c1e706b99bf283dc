//! Schema validation + compilation of the node tree into matcher tables,
//! and evaluation.
//!
//! Matcher layout (chosen so that evaluation cost does not grow with the
//! number of rules):
//! * exact host names: one hash map `name -> [(rule, ports)]`;
//! * `*.suffix` patterns: one hash map keyed by the suffix, probed once per
//!   label boundary of the requested name (`a.b.example.com` probes
//!   `b.example.com`, `example.com`, `com`), so `*.x` matches only proper
//!   subdomains of `x`;
//! * CIDRs: per-prefix-length hash tables for IPv4 and IPv6
//!   ([`CidrTable`]);
//! * rules without destinations (deny / escalate only) are checked on every
//!   request;
//! * workload / exe / taint-path globs are `globset` sets, interned so that
//!   identical lists are compiled once.
//!
//! Candidates are sorted by (action, file order): deny before escalate
//! before allow, so the first candidate whose conditions hold decides.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use super::classify_ip;
use super::context::ContextView;
use super::fxhash::FxHashMap;
use super::host::{HostError, normalize_host, normalize_non_literal, parse_ip_literal};
use super::ip::CidrTable;
use super::parse::{Kind, Node};
use super::{
    CacheScope, DEFAULT_CACHE_TTL, DefaultAction, EvalRequest, Evaluation, HostSource, Mode,
    PolicyError, Verdict,
};

/// Id of the implicit rule built from `egress_allowlist` (reserved).
pub const ALLOWLIST_RULE_ID: &str = "egress_allowlist";
/// Longest accepted `within` window.
const MAX_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Ancestors consulted for taint (the chain a PEP sends is bounded too).
const MAX_ANCESTORS: usize = 64;
/// Errors reported at most (a policy with more is hopeless anyway).
const MAX_ERRORS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Action {
    Deny = 0,
    Escalate = 1,
    Allow = 2,
}

#[derive(Debug, Clone)]
enum Ports {
    All,
    Ranges(Arc<[(u16, u16)]>),
}

impl Ports {
    fn contains(&self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Ranges(r) => r.iter().any(|&(a, b)| a <= port && port <= b),
        }
    }
}

#[derive(Debug, Clone)]
struct DestEntry {
    rule: u32,
    ports: Ports,
}

struct Taint {
    globs: Arc<Globs>,
    within: Duration,
}

struct Rule {
    /// Position in the policy (candidates sort by it).
    index: u32,
    id: String,
    action: Action,
    workloads: Option<Arc<Globs>>,
    processes: Option<Arc<Globs>>,
    when: Option<Taint>,
    /// `rule:<id>`, precomputed.
    reason: String,
}

pub(crate) struct Compiled {
    pub(crate) mode: Mode,
    pub(crate) default: DefaultAction,
    pub(crate) require_sensor: bool,
    pub(crate) max_window: Option<Duration>,
    pub(crate) source: String,
    rules: Vec<Rule>,
    exact: FxHashMap<Box<str>, Vec<DestEntry>>,
    wildcard: FxHashMap<Box<str>, Vec<DestEntry>>,
    cidrs: CidrTable<DestEntry>,
    /// Deny / escalate rules without destinations, in (action, index) order.
    anydest: Vec<u32>,
    resolved_ip_allow: CidrTable<()>,
}

// ---------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------

struct Errs {
    list: Vec<PolicyError>,
    rule_id: Option<String>,
}

impl Errs {
    fn push(&mut self, node: &Node, path: &str, msg: impl Into<String>) {
        if self.list.len() >= MAX_ERRORS {
            return;
        }
        let mut e = node.error(msg);
        e.rule_id = self.rule_id.clone();
        e.path = path.to_owned();
        self.list.push(e);
    }
}

fn map_entries<'a>(
    node: &'a Node,
    path: &str,
    allowed: &[&str],
    errs: &mut Errs,
) -> Option<Vec<(&'a str, &'a Node, &'a Node)>> {
    let Kind::Map(entries) = &node.kind else {
        errs.push(
            node,
            path,
            format!("expected a mapping, found {}", node.type_name()),
        );
        return None;
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let Kind::Scalar { value, .. } = &k.kind else {
            errs.push(k, path, "mapping keys must be plain strings");
            continue;
        };
        let key_path = join(path, value);
        if !allowed.contains(&value.as_str()) {
            errs.push(
                k,
                &key_path,
                format!(
                    "unknown key `{value}` (expected one of: {})",
                    allowed.join(", ")
                ),
            );
            continue;
        }
        if !seen.insert(value.as_str()) {
            errs.push(k, &key_path, format!("duplicate key `{value}`"));
            continue;
        }
        out.push((value.as_str(), k, v));
    }
    Some(out)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn scalar_str<'a>(node: &'a Node, path: &str, what: &str, errs: &mut Errs) -> Option<&'a str> {
    match &node.kind {
        Kind::Scalar { value, .. } if !node.is_null() => Some(value.as_str()),
        _ => {
            errs.push(
                node,
                path,
                format!("expected {what} (a string), found {}", node.type_name()),
            );
            None
        }
    }
}

fn seq_items<'a>(node: &'a Node, path: &str, errs: &mut Errs) -> Option<&'a [Node]> {
    match &node.kind {
        Kind::Seq(items) => Some(items),
        _ => {
            errs.push(
                node,
                path,
                format!("expected a sequence, found {}", node.type_name()),
            );
            None
        }
    }
}

/// Parse `200ms`, `30s`, `10m`, `1h`, `2d` or concatenations (`1h30m`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(format!(
                "invalid duration `{s}` (expected e.g. 200ms, 30s, 10m, 1h, 1d)"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid number in `{s}`"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => {
                return Err(format!(
                    "invalid duration unit in `{s}` (use ms, s, m, h or d)"
                ));
            }
        };
        total = total.saturating_add(d);
    }
    if total.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(total)
}

/// A compiled glob list. Patterns without metacharacters (the common case
/// for exe paths) are compared as strings; only real globs go through
/// `globset`.
pub(crate) struct Globs {
    literals: Vec<Box<str>>,
    set: Option<GlobSet>,
}

impl Globs {
    pub(crate) fn is_match(&self, s: &str) -> bool {
        self.literals.iter().any(|l| **l == *s) || self.set.as_ref().is_some_and(|g| g.is_match(s))
    }
}

fn is_literal_glob(p: &str) -> bool {
    !p.bytes()
        .any(|c| matches!(c, b'*' | b'?' | b'[' | b']' | b'{' | b'}' | b'\\'))
}

#[derive(Default)]
struct GlobInterner {
    sets: HashMap<Vec<String>, Arc<Globs>>,
}

impl GlobInterner {
    fn build(&mut self, node: &Node, path: &str, errs: &mut Errs) -> Option<Arc<Globs>> {
        let items = seq_items(node, path, errs)?;
        if items.is_empty() {
            errs.push(
                node,
                path,
                "must not be empty (omit the key to match everything)",
            );
            return None;
        }
        let mut pats = Vec::with_capacity(items.len());
        let mut literals = Vec::new();
        let mut builder = GlobSetBuilder::new();
        let mut globs = 0usize;
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(s) = scalar_str(item, &p, "a glob", errs) else {
                ok = false;
                continue;
            };
            match GlobBuilder::new(s).literal_separator(true).build() {
                Ok(g) => {
                    if is_literal_glob(s) {
                        literals.push(Box::from(s));
                    } else {
                        builder.add(g);
                        globs += 1;
                    }
                    pats.push(s.to_owned());
                }
                Err(e) => {
                    errs.push(item, &p, format!("invalid glob `{s}`: {}", e.kind()));
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        if let Some(set) = self.sets.get(&pats) {
            return Some(set.clone());
        }
        let set = if globs == 0 {
            Ok(None)
        } else {
            builder.build().map(Some)
        };
        match set {
            Ok(set) => {
                let set = Arc::new(Globs { literals, set });
                self.sets.insert(pats, set.clone());
                Some(set)
            }
            Err(e) => {
                errs.push(node, path, format!("invalid globs: {e}"));
                None
            }
        }
    }
}

fn port_number(t: &str) -> Option<u16> {
    let t = t.trim();
    if t.is_empty() || t.len() > 5 || !t.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    t.parse::<u16>().ok().filter(|&p| p != 0)
}

fn parse_port_item(node: &Node, path: &str, errs: &mut Errs) -> Option<(u16, u16)> {
    let s = scalar_str(node, path, "a port or \"a-b\" range", errs)?;
    let port = port_number;
    let range = match s.split_once('-') {
        Some((a, b)) => port(a).zip(port(b)),
        None => port(s).map(|p| (p, p)),
    };
    match range {
        Some((a, b)) if a <= b => Some((a, b)),
        Some(_) => {
            errs.push(node, path, format!("port range `{s}` is reversed"));
            None
        }
        None => {
            errs.push(
                node,
                path,
                format!("invalid port `{s}` (expected 1-65535 or \"a-b\")"),
            );
            None
        }
    }
}

fn parse_ports(node: &Node, path: &str, errs: &mut Errs) -> Option<Ports> {
    let items = seq_items(node, path, errs)?;
    if items.is_empty() {
        errs.push(
            node,
            path,
            "must not be empty (omit `ports` to match every port)",
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match parse_port_item(item, &format!("{path}[{i}]"), errs) {
            Some(r) => out.push(r),
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    out.sort_unstable();
    Some(Ports::Ranges(out.into()))
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        if n.trunc() != n {
            return Err(format!(
                "`{s}` has host bits set (did you mean {}?)",
                n.trunc()
            ));
        }
        return Ok(n);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "invalid CIDR `{s}` (expected e.g. 10.20.0.0/16 or 2001:db8::/32)"
    ))
}

enum HostPat {
    Exact(String),
    Suffix(String),
}

fn parse_host_pattern(s: &str) -> Result<HostPat, String> {
    if s.trim() == "*" {
        return Err("a bare `*` is refused: set `default:` instead".into());
    }
    if let Some(rest) = s.strip_prefix("*.") {
        if rest.contains('*') {
            return Err(format!(
                "invalid host pattern `{s}`: only a leading `*.` is supported"
            ));
        }
        return match normalize_host(rest) {
            Ok(n) => Ok(HostPat::Suffix(n)),
            Err(HostError::IpLiteral) => Err(format!(
                "`{s}`: a wildcard over an IP address is not a host pattern; use `cidr`"
            )),
            Err(e) => Err(format!("invalid host pattern `{s}`: {e}")),
        };
    }
    if s.contains('*') {
        return Err(format!(
            "invalid host pattern `{s}`: only a leading `*.` wildcard is supported"
        ));
    }
    if parse_ip_literal(s).is_some() {
        return Err(format!(
            "`{s}` is an IP address: host rules match names only; use `cidr: {s}`"
        ));
    }
    if s.contains(':') {
        return Err(format!("invalid host `{s}`: put ports under `ports:`"));
    }
    match normalize_host(s) {
        Ok(n) => Ok(HostPat::Exact(n)),
        Err(HostError::IpLiteral) => Err(format!(
            "`{s}` is an IP address: host rules match names only; use `cidr`"
        )),
        Err(e) => Err(format!("invalid host `{s}`: {e}")),
    }
}

struct Builder {
    rules: Vec<Rule>,
    exact: FxHashMap<Box<str>, Vec<DestEntry>>,
    wildcard: FxHashMap<Box<str>, Vec<DestEntry>>,
    cidrs: CidrTable<DestEntry>,
    anydest: Vec<u32>,
    globs: GlobInterner,
}

enum Dest {
    Host(HostPat, Ports),
    Cidr(IpNet, Ports),
}

impl Builder {
    fn add_rule(&mut self, mut rule: Rule, dests: Option<Vec<Dest>>) {
        let idx = u32::try_from(self.rules.len()).unwrap_or(u32::MAX);
        rule.index = idx;
        match dests {
            None => self.anydest.push(idx),
            Some(ds) => {
                for d in ds {
                    match d {
                        Dest::Host(HostPat::Exact(h), ports) => self
                            .exact
                            .entry(h.into_boxed_str())
                            .or_default()
                            .push(DestEntry { rule: idx, ports }),
                        Dest::Host(HostPat::Suffix(h), ports) => self
                            .wildcard
                            .entry(h.into_boxed_str())
                            .or_default()
                            .push(DestEntry { rule: idx, ports }),
                        Dest::Cidr(net, ports) => {
                            self.cidrs.insert(net, DestEntry { rule: idx, ports })
                        }
                    }
                }
            }
        }
        self.rules.push(rule);
    }
}

fn compile_destinations(node: &Node, path: &str, errs: &mut Errs) -> Option<Vec<Dest>> {
    let items = seq_items(node, path, errs)?;
    if items.is_empty() {
        errs.push(
            node,
            path,
            "must not be empty (omit `destinations` to match any destination)",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(entries) = map_entries(item, &p, &["host", "cidr", "ports"], errs) else {
            ok = false;
            continue;
        };
        let mut host = None;
        let mut cidr = None;
        let mut ports = Some(Ports::All);
        for (k, knode, v) in entries {
            let kp = join(&p, k);
            match k {
                "host" => host = Some((knode, v, kp)),
                "cidr" => cidr = Some((knode, v, kp)),
                _ => ports = parse_ports(v, &kp, errs),
            }
        }
        let target = match (host, cidr) {
            (Some(_), Some((knode, _, kp))) => {
                errs.push(
                    knode,
                    &kp,
                    "a destination has either `host` or `cidr`, not both",
                );
                None
            }
            (None, None) => {
                errs.push(item, &p, "a destination needs `host` or `cidr`");
                None
            }
            (Some((_, v, kp)), None) => scalar_str(v, &kp, "a host", errs).and_then(|s| {
                parse_host_pattern(s)
                    .map_err(|m| errs.push(v, &kp, m))
                    .ok()
                    .map(Ok)
            }),
            (None, Some((_, v, kp))) => scalar_str(v, &kp, "a CIDR", errs).and_then(|s| {
                parse_cidr(s)
                    .map_err(|m| errs.push(v, &kp, m))
                    .ok()
                    .map(Err)
            }),
        };
        match (target, ports) {
            (Some(Ok(h)), Some(ports)) => out.push(Dest::Host(h, ports)),
            (Some(Err(n)), Some(ports)) => out.push(Dest::Cidr(n, ports)),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn valid_rule_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

const RULE_KEYS: &[&str] = &[
    "id",
    "description",
    "action",
    "workloads",
    "processes",
    "destinations",
    "when",
];

fn compile_rule(
    b: &mut Builder,
    node: &Node,
    path: &str,
    ids: &mut HashMap<String, u32>,
    max_window: &mut Option<Duration>,
    errs: &mut Errs,
) -> Option<(Rule, Option<Vec<Dest>>)> {
    // Find the id first so that every error of this rule carries it.
    errs.rule_id = None;
    let mut id: Option<String> = None;
    if let Kind::Map(entries) = &node.kind {
        for (k, v) in entries {
            if matches!(&k.kind, Kind::Scalar { value, .. } if value == "id")
                && let Kind::Scalar { value, .. } = &v.kind
                && !v.is_null()
            {
                id = Some(value.clone());
                errs.rule_id = Some(value.clone());
            }
        }
    }
    let entries = map_entries(node, path, RULE_KEYS, errs)?;
    let mut ok = true;
    let mut action = None;
    let mut workloads = None;
    let mut processes = None;
    let mut dests = None;
    let mut when = None;
    let mut saw_id = false;
    for (k, _knode, v) in &entries {
        let kp = join(path, k);
        match *k {
            "id" => {
                saw_id = true;
                match scalar_str(v, &kp, "a rule id", errs) {
                    Some(s) if !valid_rule_id(s) => {
                        errs.push(
                            v,
                            &kp,
                            format!("invalid rule id `{s}` (1-128 of A-Z a-z 0-9 - _ . :)"),
                        );
                        ok = false;
                    }
                    Some(s) if s == ALLOWLIST_RULE_ID => {
                        errs.push(
                            v,
                            &kp,
                            format!("rule id `{s}` is reserved for egress_allowlist"),
                        );
                        ok = false;
                    }
                    Some(s) => {
                        if let Some(first_line) = ids.get(s) {
                            errs.push(
                                v,
                                &kp,
                                format!(
                                    "duplicate rule id `{s}` (first defined on line {first_line})"
                                ),
                            );
                            ok = false;
                        } else {
                            ids.insert(s.to_owned(), v.line);
                        }
                    }
                    None => ok = false,
                }
            }
            "description" => {
                if scalar_str(v, &kp, "a description", errs).is_none() {
                    ok = false;
                }
            }
            "action" => match scalar_str(v, &kp, "an action", errs) {
                Some("allow") => action = Some(Action::Allow),
                Some("deny") => action = Some(Action::Deny),
                Some("escalate") => action = Some(Action::Escalate),
                Some(other) => {
                    errs.push(
                        v,
                        &kp,
                        format!("invalid action `{other}` (expected allow, deny or escalate)"),
                    );
                    ok = false;
                }
                None => ok = false,
            },
            "workloads" => {
                workloads = b.globs.build(v, &kp, errs);
                ok &= workloads.is_some();
            }
            "processes" => {
                processes = b.globs.build(v, &kp, errs);
                ok &= processes.is_some();
            }
            "destinations" => {
                dests = compile_destinations(v, &kp, errs);
                ok &= dests.is_some();
            }
            _ => {
                // "when"
                when = compile_when(b, v, &kp, errs);
                match &when {
                    Some(t) => {
                        *max_window = Some(max_window.map_or(t.within, |m| m.max(t.within)));
                    }
                    None => ok = false,
                }
            }
        }
    }
    if !saw_id {
        errs.push(node, path, "missing required key `id`");
        ok = false;
    }
    let had_dest_key = entries.iter().any(|(k, _, _)| *k == "destinations");
    match action {
        None => {
            if !entries.iter().any(|(k, _, _)| *k == "action") {
                errs.push(node, path, "missing required key `action`");
            }
            ok = false;
        }
        Some(Action::Allow) if !had_dest_key => {
            errs.push(
                node,
                path,
                "an `allow` rule must list `destinations` (allow-everything is not expressible; use `default`)",
            );
            ok = false;
        }
        Some(_) => {}
    }
    if !ok {
        return None;
    }
    let id = id?;
    let action = action?;
    Some((
        Rule {
            index: 0,
            reason: format!("rule:{id}"),
            id,
            action,
            workloads,
            processes,
            when,
        },
        dests,
    ))
}

fn compile_when(b: &mut Builder, node: &Node, path: &str, errs: &mut Errs) -> Option<Taint> {
    let entries = map_entries(node, path, &["process_or_ancestor_opened", "within"], errs)?;
    let mut globs = None;
    let mut within = None;
    let mut ok = true;
    for (k, _, v) in &entries {
        let kp = join(path, k);
        if *k == "within" {
            match scalar_str(v, &kp, "a duration", errs).map(parse_duration) {
                Some(Ok(d)) if d > MAX_WITHIN => {
                    errs.push(v, &kp, "`within` must be at most 7d");
                    ok = false;
                }
                Some(Ok(d)) => within = Some(d),
                Some(Err(m)) => {
                    errs.push(v, &kp, m);
                    ok = false;
                }
                None => ok = false,
            }
        } else {
            globs = b.globs.build(v, &kp, errs);
            ok &= globs.is_some();
        }
    }
    for key in ["process_or_ancestor_opened", "within"] {
        if !entries.iter().any(|(k, _, _)| *k == key) {
            errs.push(node, path, format!("missing required key `{key}`"));
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    Some(Taint {
        globs: globs?,
        within: within?,
    })
}

fn compile_allowlist(node: &Node, path: &str, errs: &mut Errs) -> Option<Vec<Dest>> {
    let items = seq_items(node, path, errs)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(s) = scalar_str(item, &p, "a host or host:port", errs) else {
            ok = false;
            continue;
        };
        let (host, ports) = match s.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') => match port_number(port) {
                Some(n) => (h, Ports::Ranges(Arc::from([(n, n)]))),
                None => {
                    errs.push(
                        item,
                        &p,
                        format!("invalid port in `{s}` (expected 1-65535)"),
                    );
                    ok = false;
                    continue;
                }
            },
            Some(_) => {
                errs.push(
                    item,
                    &p,
                    format!(
                        "`{s}` looks like an IPv6 address: IP destinations need a rule with `cidr`"
                    ),
                );
                ok = false;
                continue;
            }
            None => (s, Ports::Ranges(Arc::from([(80, 80), (443, 443)]))),
        };
        match parse_host_pattern(host) {
            Ok(h) => out.push(Dest::Host(h, ports)),
            Err(m) => {
                errs.push(item, &p, m);
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

const TOP_KEYS: &[&str] = &[
    "version",
    "description",
    "mode",
    "default",
    "require_sensor",
    "resolved_ip_allow",
    "egress_allowlist",
    "rules",
];

pub(crate) fn compile(root: Node, source: &str) -> Result<Compiled, Vec<PolicyError>> {
    let mut errs = Errs {
        list: Vec::new(),
        rule_id: None,
    };
    let mut b = Builder {
        rules: Vec::new(),
        exact: FxHashMap::default(),
        wildcard: FxHashMap::default(),
        cidrs: CidrTable::default(),
        anydest: Vec::new(),
        globs: GlobInterner::default(),
    };
    let mut mode = Mode::Enforce;
    let mut default = DefaultAction::Deny;
    let mut require_sensor = false;
    let mut max_window = None;
    let mut resolved_ip_allow = CidrTable::default();
    let Some(entries) = map_entries(&root, "", TOP_KEYS, &mut errs) else {
        return Err(errs.list);
    };
    if !entries.iter().any(|(k, _, _)| *k == "version") {
        errs.push(&root, "", "missing required key `version` (must be 1)");
    }
    // The allowlist shorthand is compiled first so its rule index is stable.
    if let Some((_, _, v)) = entries.iter().find(|(k, _, _)| *k == "egress_allowlist")
        && let Some(dests) = compile_allowlist(v, "egress_allowlist", &mut errs)
        && !dests.is_empty()
    {
        b.add_rule(
            Rule {
                index: 0,
                id: ALLOWLIST_RULE_ID.to_owned(),
                action: Action::Allow,
                workloads: None,
                processes: None,
                when: None,
                reason: format!("rule:{ALLOWLIST_RULE_ID}"),
            },
            Some(dests),
        );
    }
    for (k, _knode, v) in &entries {
        let kp = (*k).to_owned();
        match *k {
            "version" => match &v.kind {
                Kind::Scalar { value, plain: true } if value == "1" => {}
                _ => errs.push(v, &kp, "unsupported `version` (must be 1)"),
            },
            "description" => {
                scalar_str(v, &kp, "a description", &mut errs);
            }
            "mode" => match scalar_str(v, &kp, "a mode", &mut errs) {
                Some("enforce") => mode = Mode::Enforce,
                Some("report") => mode = Mode::Report,
                Some(o) => errs.push(
                    v,
                    &kp,
                    format!("invalid mode `{o}` (expected enforce or report)"),
                ),
                None => {}
            },
            "default" => match scalar_str(v, &kp, "a default action", &mut errs) {
                Some("deny") => default = DefaultAction::Deny,
                Some("escalate") => default = DefaultAction::Escalate,
                Some(o) => errs.push(
                    v,
                    &kp,
                    format!("invalid default `{o}` (expected deny or escalate)"),
                ),
                None => {}
            },
            "require_sensor" => match &v.kind {
                Kind::Scalar { value, plain: true } if value == "true" => require_sensor = true,
                Kind::Scalar { value, plain: true } if value == "false" => require_sensor = false,
                _ => errs.push(v, &kp, "expected true or false"),
            },
            "resolved_ip_allow" => {
                if let Some(items) = seq_items(v, &kp, &mut errs) {
                    for (i, item) in items.iter().enumerate() {
                        let p = format!("{kp}[{i}]");
                        if let Some(s) = scalar_str(item, &p, "a CIDR", &mut errs) {
                            match parse_cidr(s) {
                                Ok(n) => resolved_ip_allow.insert(n, ()),
                                Err(m) => errs.push(item, &p, m),
                            }
                        }
                    }
                }
            }
            "egress_allowlist" => {}
            _ => {
                // "rules"
                let Some(items) = seq_items(v, &kp, &mut errs) else {
                    continue;
                };
                let mut ids = HashMap::new();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("rules[{i}]");
                    if let Some((rule, dests)) =
                        compile_rule(&mut b, item, &p, &mut ids, &mut max_window, &mut errs)
                    {
                        b.add_rule(rule, dests);
                    }
                    errs.rule_id = None;
                }
            }
        }
    }
    if !errs.list.is_empty() {
        errs.list.sort_by_key(|e| (e.line, e.column));
        return Err(errs.list);
    }
    let mut anydest = b.anydest;
    anydest.sort_by_key(|&r| (b.rules[r as usize].action, r));
    Ok(Compiled {
        mode,
        default,
        require_sensor,
        max_window,
        source: source.to_owned(),
        rules: b.rules,
        exact: b.exact,
        wildcard: b.wildcard,
        cidrs: b.cidrs,
        anydest,
        resolved_ip_allow,
    })
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

/// What the decision depended on (drives `context_dependent` and caching).
#[derive(Default)]
struct Deps {
    exe: bool,
    taint: bool,
    /// A taint / exe condition could not be checked (unattributed process)
    /// and was assumed to hold (fail closed).
    unattributed: bool,
    tainted: bool,
    escalation: bool,
    dns_learned: bool,
    /// Malformed input: never turned into an allow by `mode: report`.
    malformed: bool,
}

enum Cond {
    No,
    /// Conditions hold; `assumed` when an exe / taint condition could not be
    /// checked (unattributed process) and was assumed to hold (fail closed).
    Yes {
        assumed: bool,
    },
}

struct Outcome {
    verdict: Verdict,
    reason: String,
    rule_id: Option<String>,
}

impl Outcome {
    fn new(verdict: Verdict, reason: impl Into<String>, rule_id: Option<&str>) -> Self {
        Outcome {
            verdict,
            reason: reason.into(),
            rule_id: rule_id.map(str::to_owned),
        }
    }
}

thread_local! {
    /// Reused candidate buffer: evaluation allocates no candidate list.
    static CANDS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

fn take_cands() -> Vec<u32> {
    let mut v = CANDS.with(std::cell::Cell::take);
    v.clear();
    v
}

fn give_back_cands(v: Vec<u32>) {
    // Do not keep a pathological buffer around.
    if v.capacity() <= 4096 {
        CANDS.with(|c| c.set(v));
    }
}

impl Compiled {
    pub(crate) fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub(crate) fn host_may_match(&self, host: &str, port: u16) -> bool {
        if self.default == DefaultAction::Escalate
            || self
                .anydest
                .iter()
                .any(|&r| self.rules[r as usize].action == Action::Escalate)
        {
            return true;
        }
        let hit = |v: &Vec<DestEntry>| {
            v.iter().any(|e| {
                e.ports.contains(port) && self.rules[e.rule as usize].action != Action::Deny
            })
        };
        if self.exact.get(host).is_some_and(hit) {
            return true;
        }
        host.match_indices('.')
            .any(|(i, _)| self.wildcard.get(&host[i + 1..]).is_some_and(hit))
    }

    /// Whether `rule`'s non-destination conditions hold for `req`.
    fn rule_applies(
        &self,
        rule: &Rule,
        req: &EvalRequest<'_>,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> Cond {
        if let Some(w) = &rule.workloads
            && !w.is_match(req.workload)
        {
            return Cond::No;
        }
        // Unattributed traffic cannot prove it is *not* from a matching /
        // tainted process: for deny and escalate rules the condition is
        // assumed to hold (fail closed); allow rules need positive proof.
        let restrictive = rule.action != Action::Allow;
        let mut assumed = false;
        if let Some(p) = &rule.processes {
            deps.exe = true;
            if req.exe.is_empty() || req.process.is_none() {
                if !restrictive {
                    return Cond::No;
                }
                assumed = true;
            } else if !p.is_match(req.exe) {
                return Cond::No;
            }
        }
        if let Some(t) = &rule.when {
            deps.taint = true;
            let Some(proc_) = req.process else {
                if !restrictive {
                    return Cond::No;
                }
                return Cond::Yes { assumed: true };
            };
            let hit = std::cell::Cell::new(false);
            let mut visit = |path: &str, age: Duration| {
                if !hit.get() && age <= t.within && t.globs.is_match(path) {
                    hit.set(true);
                }
            };
            ctx.visit_opens(req.workload, proc_, &mut visit);
            for a in req.ancestors.iter().take(MAX_ANCESTORS) {
                if hit.get() {
                    break;
                }
                ctx.visit_opens(req.workload, *a, &mut visit);
            }
            if !hit.get() {
                return Cond::No;
            }
            deps.tainted = true;
        }
        Cond::Yes { assumed }
    }

    /// First applicable candidate (candidates sorted by (action, index)).
    fn first_applicable(
        &self,
        cands: &[u32],
        req: &EvalRequest<'_>,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> Option<&Rule> {
        for &r in cands {
            let rule = &self.rules[r as usize];
            if let Cond::Yes { assumed } = self.rule_applies(rule, req, ctx, deps) {
                deps.unattributed |= assumed;
                return Some(rule);
            }
        }
        None
    }

    fn sort_cands(&self, cands: &mut Vec<u32>) {
        cands.sort_unstable_by_key(|&r| (self.rules[r as usize].action, r));
        cands.dedup();
    }

    /// Outcome of a matched rule (escalations consult operator state).
    fn rule_outcome(
        &self,
        rule: &Rule,
        req: &EvalRequest<'_>,
        host_key: &str,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> Outcome {
        let id = Some(rule.id.as_str());
        match rule.action {
            Action::Deny if deps.unattributed => {
                Outcome::new(Verdict::Deny, "fail_closed:unattributed", id)
            }
            Action::Deny if rule.when.is_some() => {
                Outcome::new(Verdict::Deny, format!("tainted:{}", rule.id), id)
            }
            Action::Deny => Outcome::new(Verdict::Deny, rule.reason.clone(), id),
            Action::Allow => Outcome::new(Verdict::Allow, rule.reason.clone(), id),
            Action::Escalate => {
                deps.escalation = true;
                match ctx.escalation_resolution(req.workload, host_key, req.port) {
                    Some(true) => Outcome::new(Verdict::Allow, "escalation_approved", id),
                    Some(false) => Outcome::new(Verdict::Deny, "escalation_denied", id),
                    _ if rule.when.is_some() => {
                        Outcome::new(Verdict::Escalate, format!("tainted:{}", rule.id), id)
                    }
                    _ => Outcome::new(Verdict::Escalate, rule.reason.clone(), id),
                }
            }
        }
    }

    fn default_outcome(
        &self,
        req: &EvalRequest<'_>,
        host_key: &str,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> Outcome {
        match self.default {
            DefaultAction::Deny => Outcome::new(Verdict::Deny, "default_deny", None),
            DefaultAction::Escalate => {
                deps.escalation = true;
                match ctx.escalation_resolution(req.workload, host_key, req.port) {
                    Some(true) => Outcome::new(Verdict::Allow, "escalation_approved", None),
                    Some(false) => Outcome::new(Verdict::Deny, "escalation_denied", None),
                    None => Outcome::new(Verdict::Escalate, "default_escalate", None),
                }
            }
        }
    }

    /// DNS-rebinding guard: every address an allowed name resolves to must
    /// be ordinary, or covered by `resolved_ip_allow`.
    fn rebinding_violation(&self, req: &EvalRequest<'_>) -> bool {
        secureops_pep::rebinding_violation(req.ip.iter().chain(req.resolved_ips).copied(), |ip| {
            self.resolved_ip_allow.contains(ip)
        })
    }

    fn decide_name(
        &self,
        name: &str,
        req: &EvalRequest<'_>,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> Outcome {
        // A DNS query does not know the port the answer will be used with:
        // a name is resolvable when some rule would allow it on any port.
        let any_port = req.host_source == HostSource::DnsQuery;
        let mut cands = take_cands();
        let mut take = |v: &Vec<DestEntry>| {
            for e in v {
                if any_port || e.ports.contains(req.port) {
                    cands.push(e.rule);
                }
            }
        };
        if let Some(v) = self.exact.get(name) {
            take(v);
        }
        if !self.wildcard.is_empty() {
            for (i, _) in name.match_indices('.') {
                if let Some(v) = self.wildcard.get(&name[i + 1..]) {
                    take(v);
                }
            }
        }
        cands.extend_from_slice(&self.anydest);
        self.sort_cands(&mut cands);
        let winner = self.first_applicable(&cands, req, ctx, deps);
        give_back_cands(cands);
        let out = match winner {
            Some(rule) => self.rule_outcome(rule, req, name, ctx, deps),
            None => self.default_outcome(req, name, ctx, deps),
        };
        if out.verdict != Verdict::Deny && self.rebinding_violation(req) {
            return Outcome::new(Verdict::Deny, "dns_rebinding", out.rule_id.as_deref());
        }
        out
    }

    fn decide_ip(
        &self,
        ip: IpAddr,
        literal: bool,
        req: &EvalRequest<'_>,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> Outcome {
        let key = ip.to_string();
        let mut cands = take_cands();
        let mut take = |e: &DestEntry| {
            if e.ports.contains(req.port) {
                cands.push(e.rule);
            }
        };
        self.cidrs.for_each_containing(ip, &mut take);
        let canon = ip.to_canonical();
        if canon != ip {
            self.cidrs.for_each_containing(canon, &mut take);
        }
        let cidr_matches = cands.len();
        // Destination-less deny / escalate rules restrict IP destinations
        // too (a tainted process must not reach an allowed CIDR either).
        cands.extend_from_slice(&self.anydest);
        self.sort_cands(&mut cands);
        let special = classify_ip(ip).is_some();
        let winner = self.first_applicable(&cands, req, ctx, deps);
        let outcome = match winner {
            Some(rule) if special && rule.action == Action::Escalate => {
                Some(Outcome::new(Verdict::Deny, "special_ip", Some(&rule.id)))
            }
            Some(rule) => {
                let o = self.rule_outcome(rule, req, &key, ctx, deps);
                // IP destinations are allowed only through `cidr` rules: an
                // approved destination-less escalation still needs an
                // applicable allow rule whose CIDR contains the IP.
                if o.verdict == Verdict::Allow && self.anydest.contains(&rule.index) {
                    let allow_cidr = cidr_matches > 0
                        && cands.iter().any(|&r| {
                            let c = &self.rules[r as usize];
                            c.action == Action::Allow
                                && !self.anydest.contains(&r)
                                && matches!(self.rule_applies(c, req, ctx, deps), Cond::Yes { .. })
                        });
                    if allow_cidr {
                        Some(o)
                    } else {
                        Some(Outcome::new(
                            Verdict::Deny,
                            if special {
                                "special_ip"
                            } else {
                                "ip_literal_no_cidr"
                            },
                            Some(&rule.id),
                        ))
                    }
                } else {
                    Some(o)
                }
            }
            None => None,
        };
        give_back_cands(cands);
        if let Some(o) = outcome {
            return o;
        }
        if !literal && req.host_source == HostSource::OriginalDst {
            // Transparent connection without SNI / Host: allowed when the
            // workload got this IP in a DNS answer for a name it may reach.
            // The answer now depends on DNS state that changes without a
            // policy change: never cache it (a cached deny would outlive
            // the DNS answer that should let the next attempt through).
            deps.dns_learned = true;
            for name in ctx.dns_names_for(req.workload, ip) {
                let Ok(n) = normalize_host(&name) else {
                    continue;
                };
                let sub = EvalRequest {
                    host: &n,
                    resolved_ips: &[],
                    ..*req
                };
                let mut sub_deps = Deps::default();
                let o = self.decide_name(&n, &sub, ctx, &mut sub_deps);
                deps.exe |= sub_deps.exe;
                deps.taint |= sub_deps.taint;
                deps.escalation |= sub_deps.escalation;
                if o.verdict == Verdict::Allow {
                    return Outcome::new(
                        Verdict::Allow,
                        format!("dns_learned:{n}:{}", o.reason),
                        o.rule_id.as_deref(),
                    );
                }
            }
        }
        if special {
            Outcome::new(Verdict::Deny, "special_ip", None)
        } else if literal {
            Outcome::new(Verdict::Deny, "ip_literal_no_cidr", None)
        } else {
            Outcome::new(Verdict::Deny, "original_dst_unmatched", None)
        }
    }

    fn decide(
        &self,
        req: &EvalRequest<'_>,
        ctx: &dyn ContextView,
        deps: &mut Deps,
    ) -> (Outcome, Option<String>) {
        let invalid = |deps: &mut Deps, reason: &str| {
            deps.malformed = true;
            Outcome::new(Verdict::Deny, reason, None)
        };
        if req.host_source == HostSource::Unspecified {
            return (invalid(deps, "invalid_request:host_source"), None);
        }
        if req.port == 0 && req.host_source != HostSource::DnsQuery {
            return (invalid(deps, "invalid_request:port"), None);
        }
        if req.host.is_empty() {
            return match req.ip {
                Some(ip) if req.host_source == HostSource::OriginalDst => (
                    self.decide_ip(ip, false, req, ctx, deps),
                    Some(ip.to_string()),
                ),
                _ => (invalid(deps, "invalid_host:empty"), None),
            };
        }
        if let Some(lit) = parse_ip_literal(req.host) {
            let key = Some(lit.to_string());
            if req.host_source == HostSource::Sni {
                // RFC 6066: SNI carries host names only.
                return (Outcome::new(Verdict::Deny, "sni_ip_literal", None), key);
            }
            if let Some(dial) = req.ip
                && dial.to_canonical() != lit.to_canonical()
            {
                return (Outcome::new(Verdict::Deny, "ip_mismatch", None), key);
            }
            return (self.decide_ip(lit, true, req, ctx, deps), key);
        }
        match normalize_non_literal(req.host) {
            Ok(name) => {
                let o = self.decide_name(&name, req, ctx, deps);
                (o, Some(name))
            }
            Err(HostError::IpLiteral) => (invalid(deps, "invalid_host:ip_like"), None),
            Err(_) => (invalid(deps, "invalid_host"), None),
        }
    }

    pub(crate) fn evaluate(&self, req: &EvalRequest<'_>, ctx: &dyn ContextView) -> Evaluation {
        let mut deps = Deps::default();
        let sensor_checked = self.require_sensor;
        let (outcome, normalized_host) = if self.require_sensor && !ctx.sensor_alive(req.workload) {
            (
                Outcome::new(Verdict::Deny, "fail_closed:sensor_unavailable", None),
                None,
            )
        } else {
            self.decide(req, ctx, &mut deps)
        };
        let mut verdict = outcome.verdict;
        let mut would_deny = false;
        if self.mode == Mode::Report && verdict != Verdict::Allow && !deps.malformed {
            verdict = Verdict::Allow;
            would_deny = true;
        }
        let context_dependent = deps.taint
            || deps.exe
            || sensor_checked
            || deps.escalation
            || deps.dns_learned
            || deps.unattributed;
        // Caching (DESIGN §8). Not cacheable: anything resting on state that
        // changes without a policy change and is not signalled per process
        // (escalation state, a taint that will age out, sensor liveness,
        // DNS-learned addresses) and report-mode overrides. Host-less
        // ORIGINAL_DST decisions stay cacheable: the PEP cache key includes
        // the dialled and resolved IPs (pep-core `cache.rs`).
        let no_cache = deps.escalation
            || deps.tainted
            || deps.unattributed
            || deps.dns_learned
            || sensor_checked
            || would_deny;
        let cache_scope = if no_cache {
            CacheScope::None
        } else if deps.exe || deps.taint {
            if req.process.is_some() {
                CacheScope::Process
            } else {
                CacheScope::None
            }
        } else {
            CacheScope::Workload
        };
        Evaluation {
            verdict,
            reason: outcome.reason,
            rule_id: outcome.rule_id,
            context_dependent,
            cache_ttl: if cache_scope == CacheScope::None {
                Duration::ZERO
            } else {
                DEFAULT_CACHE_TTL
            },
            cache_scope,
            would_deny,
            normalized_host,
        }
    }
}
