//! The process-context view the evaluator consults, and an in-memory
//! implementation for tests and embedded use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use super::ProcKey;

/// Read access to per-workload process context (implemented by the PDP's
/// context store).
pub trait ContextView {
    /// Visit each recorded sensitive open of this process: (path, age since
    /// the open).
    fn visit_opens(&self, workload: &str, proc_: ProcKey, f: &mut dyn FnMut(&str, Duration));
    /// Names this workload learned for `ip` from DNS answers of allowed
    /// names (unexpired).
    fn dns_names_for(&self, workload: &str, ip: IpAddr) -> Vec<String>;
    /// Whether the workload's context sensor is alive.
    fn sensor_alive(&self, workload: &str) -> bool;
    /// Operator resolution of an escalation for (workload, normalised host,
    /// port): `Some(true)` approved, `Some(false)` denied, `None` pending /
    /// unknown.
    fn escalation_resolution(&self, workload: &str, host: &str, port: u16) -> Option<bool>;
}

/// A simple in-memory [`ContextView`]; ages are fixed at insertion.
#[derive(Debug, Default, Clone)]
pub struct MemoryContext {
    /// (workload, process) -> [(path, age)]
    pub opens: HashMap<(String, ProcKey), Vec<(String, Duration)>>,
    /// (workload, ip) -> names
    pub dns: HashMap<(String, IpAddr), Vec<String>>,
    /// workloads whose sensor is alive
    pub sensors: Vec<String>,
    /// (workload, host, port) -> approved?
    pub escalations: HashMap<(String, String, u16), bool>,
}

impl MemoryContext {
    /// Empty context.
    pub fn new() -> Self {
        Self::default()
    }
    /// Record an open of `path` by `p`, `age` ago.
    pub fn add_open(&mut self, workload: &str, p: ProcKey, path: &str, age: Duration) {
        self.opens
            .entry((workload.to_owned(), p))
            .or_default()
            .push((path.to_owned(), age));
    }
    /// Record a DNS answer `name -> ip` learned by the workload.
    pub fn add_dns(&mut self, workload: &str, ip: IpAddr, name: &str) {
        self.dns
            .entry((workload.to_owned(), ip))
            .or_default()
            .push(name.to_owned());
    }
    /// Mark the workload's sensor alive.
    pub fn set_sensor_alive(&mut self, workload: &str) {
        self.sensors.push(workload.to_owned());
    }
    /// Record an operator resolution.
    pub fn resolve(&mut self, workload: &str, host: &str, port: u16, approved: bool) {
        self.escalations
            .insert((workload.to_owned(), host.to_owned(), port), approved);
    }
}

impl ContextView for MemoryContext {
    fn visit_opens(&self, workload: &str, proc_: ProcKey, f: &mut dyn FnMut(&str, Duration)) {
        if let Some(v) = self.opens.get(&(workload.to_owned(), proc_)) {
            for (p, age) in v {
                f(p, *age);
            }
        }
    }
    fn dns_names_for(&self, workload: &str, ip: IpAddr) -> Vec<String> {
        self.dns
            .get(&(workload.to_owned(), ip))
            .cloned()
            .unwrap_or_default()
    }
    fn sensor_alive(&self, workload: &str) -> bool {
        self.sensors.iter().any(|w| w == workload)
    }
    fn escalation_resolution(&self, workload: &str, host: &str, port: u16) -> Option<bool> {
        self.escalations
            .get(&(workload.to_owned(), host.to_owned(), port))
            .copied()
    }
}
