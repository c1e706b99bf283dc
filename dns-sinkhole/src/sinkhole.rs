//! [`DnsSinkhole`]: the hickory-server [`RequestHandler`] that decides every
//! query through the PDP and either forwards it or sinkholes it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use secureops_pep::{
    ConnectionRequest, Decision, FailMode, HostSource, PdpOutcome, PolicyDecisionPoint,
    ProcessIdentity, Transport,
};
use secureops_proto::v1::AuditFinding;

use crate::attribution::ClientAttribution;
use crate::audit::AuditSink;
use crate::cache::{AnswerCache, CachedAnswer, cache_key};
use crate::context::ContextReporter;
use crate::exfil::{ExfilGuard, ExfilVerdict};
use crate::forward::Forwarder;
use crate::metrics::{DnsMetrics, QueryLabels};
use crate::name::normalize_query_name;

/// What a sinkholed query gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkholeAnswer {
    /// NXDOMAIN: the name does not exist (default; what resolvers and
    /// `getaddrinfo` treat as a definitive "no").
    #[default]
    NxDomain,
    /// REFUSED.
    Refused,
    /// NOERROR with no records.
    NoData,
    /// `0.0.0.0` for A, `::` for AAAA, NODATA for other types.
    Zero,
}

impl std::str::FromStr for SinkholeAnswer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "nxdomain" => Ok(SinkholeAnswer::NxDomain),
            "refused" => Ok(SinkholeAnswer::Refused),
            "nodata" => Ok(SinkholeAnswer::NoData),
            "zero" | "0.0.0.0" | "null" => Ok(SinkholeAnswer::Zero),
            other => Err(format!(
                "unknown sinkhole answer {other:?} (expected nxdomain|refused|nodata|zero)"
            )),
        }
    }
}

/// Static configuration of a [`DnsSinkhole`].
#[derive(Debug, Clone)]
pub struct SinkholeConfig {
    pub workload_id: String,
    pub pep_id: String,
    pub sinkhole_answer: SinkholeAnswer,
    /// Outer bound on one PDP decision (the gRPC client has its own
    /// deadline; this also bounds any other PDP implementation).
    pub pdp_timeout: Duration,
    pub fail_mode: FailMode,
    /// TTL of synthesised sinkhole answers (0.0.0.0 / ::).
    pub sinkhole_ttl: u32,
    /// EDNS payload size we advertise to clients.
    pub edns_payload: u16,
    /// Answer *sinkholed* queries as soon as their audit record is queued,
    /// without waiting for the spool's fdatasync. Nothing leaves the box for
    /// them either way; the cost is that a crash inside one group commit
    /// can lose the record of a denied query. Allowed queries always wait
    /// for the durable record before anything is answered or forwarded.
    pub audit_async_deny: bool,
    /// Whether the PDP looks at the requesting process (GrpcPdp: process
    /// rules, process-scoped cache entries). The standalone `AllowlistPdp`
    /// decides on the host only, so the UDP fast path hands it the process
    /// ids without cloning exe / argv / ancestors (the audit record still
    /// carries pid, start time, exe and uid).
    pub pdp_uses_process: bool,
}

impl Default for SinkholeConfig {
    fn default() -> Self {
        SinkholeConfig {
            workload_id: "default".into(),
            pep_id: "secureops-dns".into(),
            sinkhole_answer: SinkholeAnswer::NxDomain,
            pdp_timeout: Duration::from_millis(50),
            fail_mode: FailMode::Closed,
            sinkhole_ttl: 60,
            edns_payload: 1232,
            audit_async_deny: false,
            pdp_uses_process: true,
        }
    }
}

/// The DNS policy enforcement point. See the crate documentation.
pub struct DnsSinkhole {
    pub(crate) cfg: SinkholeConfig,
    pub(crate) pdp: Arc<dyn PolicyDecisionPoint>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) cache: Arc<AnswerCache>,
    pub(crate) exfil: Arc<ExfilGuard>,
    pub(crate) audit: Arc<dyn AuditSink>,
    pub(crate) context: Option<ContextReporter>,
    pub(crate) attributor: Option<Arc<ClientAttribution>>,
    pub(crate) metrics: DnsMetrics,
    seq: AtomicU64,
    /// `dns-<boot time, hex>-`: prefix of every request id.
    boot: String,
    /// Counters of the two common UDP outcomes, resolved once (the label
    /// lookup of `count` is measurable at fast-path rates).
    udp_allow_policy: prometheus_client::metrics::counter::Counter,
    udp_deny_policy: prometheus_client::metrics::counter::Counter,
}

/// Everything needed to build a [`DnsSinkhole`].
pub struct SinkholeParts {
    pub cfg: SinkholeConfig,
    pub pdp: Arc<dyn PolicyDecisionPoint>,
    pub forwarder: Arc<Forwarder>,
    pub cache: Arc<AnswerCache>,
    pub exfil: Arc<ExfilGuard>,
    pub audit: Arc<dyn AuditSink>,
    pub context: Option<ContextReporter>,
    pub attributor: Option<Arc<ClientAttribution>>,
    pub metrics: DnsMetrics,
}

/// Outcome of the policy part of one query.
#[derive(Clone)]
pub(crate) struct Verdict {
    pub(crate) outcome: PdpOutcome,
    pub(crate) cause: &'static str,
    pub(crate) detail: &'static str,
}

pub(crate) fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Wire form of a question for the normalised `name`.
fn question_wire(name: &str, qtype: u16, qclass: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(name.len() + 6);
    for label in name.split('.') {
        // normalize_query_name guarantees 1..=63 bytes per label.
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    q
}

fn answer_ips(records: &[Record]) -> (Vec<IpAddr>, u32) {
    let mut ips = Vec::new();
    let mut ttl = u32::MAX;
    for r in records {
        match &r.data {
            RData::A(a) => ips.push(IpAddr::V4(a.0)),
            RData::AAAA(a) => ips.push(IpAddr::V6(a.0)),
            _ => continue,
        }
        ttl = ttl.min(r.ttl);
    }
    (ips, if ttl == u32::MAX { 0 } else { ttl })
}

impl DnsSinkhole {
    pub fn new(p: SinkholeParts) -> Self {
        let udp = |decision: Decision| {
            p.metrics
                .queries
                .get_or_create(&QueryLabels {
                    decision: decision.as_str(),
                    cause: "policy",
                    transport: "udp",
                })
                .clone()
        };
        let udp_allow_policy = udp(Decision::Allow);
        let udp_deny_policy = udp(Decision::Deny);
        DnsSinkhole {
            udp_allow_policy,
            udp_deny_policy,
            cfg: p.cfg,
            pdp: p.pdp,
            forwarder: p.forwarder,
            cache: p.cache,
            exfil: p.exfil,
            audit: p.audit,
            context: p.context,
            attributor: p.attributor,
            metrics: p.metrics,
            seq: AtomicU64::new(0),
            boot: format!("dns-{:x}-", now_nanos()),
        }
    }

    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    /// The PDP request for one query of `host`.
    pub(crate) fn dns_request(
        &self,
        host: String,
        process: ProcessIdentity,
        transport: Transport,
    ) -> ConnectionRequest {
        self.dns_request_in(host, String::new(), String::new(), process, transport)
    }

    /// [`Self::dns_request`] writing the request id and workload into the
    /// given (recycled) buffers instead of new allocations.
    pub(crate) fn dns_request_in(
        &self,
        host: String,
        mut request_id: String,
        mut workload_id: String,
        process: ProcessIdentity,
        transport: Transport,
    ) -> ConnectionRequest {
        self.write_request_id(&mut request_id);
        workload_id.clone_from(&self.cfg.workload_id);
        ConnectionRequest {
            request_id,
            workload_id,
            process,
            host,
            port: 53,
            ip: None,
            resolved_ips: Vec::new(),
            host_source: HostSource::DnsQuery,
            transport,
        }
    }

    pub(crate) fn request_id(&self) -> String {
        let mut id = String::with_capacity(self.boot.len() + 20);
        self.write_request_id(&mut id);
        id
    }

    fn write_request_id(&self, id: &mut String) {
        use std::fmt::Write;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        id.clear();
        id.push_str(&self.boot);
        let _ = write!(id, "{n}");
    }

    /// Policy: PDP (bounded), fail mode, then the exfiltration budget.
    pub(crate) async fn decide(&self, req: &ConnectionRequest) -> Verdict {
        let outcome = match tokio::time::timeout(self.cfg.pdp_timeout, self.pdp.decide(req)).await {
            Ok(o) => o,
            Err(_) => PdpOutcome::fail_closed("pdp_timeout"),
        };
        self.verdict(req, outcome)
    }

    /// The rest of [`Self::decide`] once the PDP answered: fail mode, then
    /// the exfiltration budget.
    pub(crate) fn verdict(&self, req: &ConnectionRequest, outcome: PdpOutcome) -> Verdict {
        let outcome = outcome.apply_fail_mode(self.cfg.fail_mode);
        if !outcome.decision.is_allow() {
            let cause = if outcome.fail_closed_cause.is_some() {
                "fail_closed"
            } else {
                "policy"
            };
            return Verdict {
                outcome,
                cause,
                detail: "",
            };
        }
        match self.exfil.check(&req.workload_id, &req.host) {
            ExfilVerdict::Ok => Verdict {
                outcome,
                cause: "policy",
                detail: "",
            },
            v => {
                let mut denied = PdpOutcome::new(Decision::Deny, "dns_exfil_budget");
                denied.rule_id = outcome.rule_id;
                denied.policy_version = outcome.policy_version;
                Verdict {
                    outcome: denied,
                    cause: "exfil_budget",
                    detail: v.detail(),
                }
            }
        }
    }

    /// The audit record of `req`'s verdict, stamped now (the hickory path;
    /// the fast path fills recycled records with [`Self::fill_finding`]).
    pub(crate) fn finding(&self, req: &ConnectionRequest, v: &Verdict) -> AuditFinding {
        let mut f = AuditFinding::default();
        self.fill_finding(&mut f, req.clone(), v.clone(), now_nanos());
        f
    }

    /// Write the audit record of `req`'s verdict into `f`, consuming both
    /// (their strings move instead of being cloned) and overwriting every
    /// field: `f` may be a recycled record of an earlier query (the fast
    /// path reuses records so their strings keep their buffers). The
    /// destructuring names every field, so a field added to the proto does
    /// not compile here until it is set, and stale data cannot leak from
    /// one query's record into the next.
    pub(crate) fn fill_finding(
        &self,
        f: &mut AuditFinding,
        req: ConnectionRequest,
        v: Verdict,
        ts: i64,
    ) {
        fn set(dst: &mut String, s: &str) {
            dst.clear();
            dst.push_str(s);
        }
        let o = v.outcome;
        let AuditFinding {
            timestamp_unix_nanos,
            pep_kind,
            pep_id,
            workload_id,
            pid,
            process_start_time,
            exe,
            uid,
            host,
            host_source,
            port,
            dialled_ip,
            transport,
            decision,
            reason,
            rule_id,
            policy_version,
            fail_closed_cause,
            escalation_id,
            request_id,
            would_deny,
            fail_mode,
            trace_id,
            detail,
        } = f;
        *timestamp_unix_nanos = ts;
        set(pep_kind, "dns");
        set(pep_id, &self.cfg.pep_id);
        *workload_id = req.workload_id;
        *pid = req.process.pid;
        *process_start_time = req.process.start_time;
        if req.process.exe.is_empty() {
            exe.clear(); // keep the buffer for the caller's `clone_from`
        } else {
            *exe = req.process.exe;
        }
        *uid = req.process.uid;
        *host = req.host;
        *host_source = req.host_source as i32;
        *port = u32::from(req.port);
        dialled_ip.clear();
        *transport = req.transport as i32;
        *decision = o.decision.to_proto() as i32;
        *reason = o.reason;
        *rule_id = o.rule_id;
        *policy_version = o.policy_version;
        *fail_closed_cause = o.fail_closed_cause.unwrap_or_default();
        *escalation_id = o.escalation_id;
        *request_id = req.request_id;
        *would_deny = o.would_deny;
        set(fail_mode, self.cfg.fail_mode.as_str());
        trace_id.clear();
        set(detail, v.detail);
    }

    pub(crate) fn count(&self, decision: Decision, cause: &'static str, protocol: Protocol) {
        if protocol != Protocol::Tcp && cause == "policy" {
            match decision {
                Decision::Allow => {
                    self.udp_allow_policy.inc();
                    return;
                }
                Decision::Deny => {
                    self.udp_deny_policy.inc();
                    return;
                }
                Decision::Escalate => {}
            }
        }
        self.metrics
            .queries
            .get_or_create(&QueryLabels {
                decision: decision.as_str(),
                cause,
                transport: if protocol == Protocol::Tcp {
                    "tcp"
                } else {
                    "udp"
                },
            })
            .inc();
    }

    /// Audit a query that never reached the PDP (malformed, invalid name).
    /// Record the audit entry of a sinkholed query (see
    /// [`SinkholeConfig::audit_async_deny`]).
    async fn record_deny(&self, finding: AuditFinding) {
        if self.cfg.audit_async_deny {
            let audit = self.audit.clone();
            let failures = self.metrics.audit_failures.clone();
            let mut fut = Box::pin(async move {
                if audit.record(finding).await.is_err() {
                    failures.inc();
                }
            });
            // Poll once here so the record is queued in the spool *before*
            // the answer goes out (the spool commits in queue order); only
            // the wait for its fdatasync continues in the background.
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            if fut.as_mut().poll(&mut cx).is_pending() {
                tokio::spawn(fut);
            }
        } else if self.audit.record(finding).await.is_err() {
            self.metrics.audit_failures.inc();
        }
    }

    async fn audit_local_deny(
        &self,
        host: &str,
        protocol: Protocol,
        reason: &'static str,
        cause: &str,
    ) {
        let req = ConnectionRequest {
            request_id: self.request_id(),
            workload_id: self.cfg.workload_id.clone(),
            process: ProcessIdentity::default(),
            host: host.into(),
            port: 53,
            ip: None,
            resolved_ips: Vec::new(),
            host_source: HostSource::DnsQuery,
            transport: if protocol == Protocol::Tcp {
                Transport::Tcp
            } else {
                Transport::Udp
            },
        };
        let v = Verdict {
            outcome: PdpOutcome::fail_closed(cause),
            cause: reason,
            detail: "",
        };
        self.record_deny(self.finding(&req, &v)).await;
    }

    fn response_edns(&self, request: &Request) -> Option<Edns> {
        request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(self.cfg.edns_payload.max(512));
            e.set_version(0);
            e.set_dnssec_ok(req.flags().dnssec_ok);
            e
        })
    }

    async fn send_error<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
        rcode: ResponseCode,
    ) -> ResponseInfo {
        let edns = self.response_edns(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        meta.response_code = rcode;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let resp = builder.build_no_records(meta);
        send(&mut handle, resp, &request.metadata).await
    }

    async fn send_sinkhole<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
        qtype: RecordType,
    ) -> ResponseInfo {
        let edns = self.response_edns(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        let mut records = Vec::new();
        match self.cfg.sinkhole_answer {
            SinkholeAnswer::NxDomain => meta.response_code = ResponseCode::NXDomain,
            SinkholeAnswer::Refused => meta.response_code = ResponseCode::Refused,
            SinkholeAnswer::NoData => {}
            SinkholeAnswer::Zero => {
                if let Some(q) = request.queries.queries().first() {
                    let name: Name = q.name().into();
                    let ttl = self.cfg.sinkhole_ttl;
                    match qtype {
                        RecordType::A => records.push(Record::from_rdata(
                            name,
                            ttl,
                            RData::A(A(Ipv4Addr::UNSPECIFIED)),
                        )),
                        RecordType::AAAA => records.push(Record::from_rdata(
                            name,
                            ttl,
                            RData::AAAA(AAAA(Ipv6Addr::UNSPECIFIED)),
                        )),
                        _ => {}
                    }
                }
            }
        }
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let resp = builder.build(meta, records.iter(), [], [], []);
        send(&mut handle, resp, &request.metadata).await
    }

    async fn send_answer<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
        answer: &CachedAnswer,
        age: u32,
    ) -> ResponseInfo {
        let edns = self.response_edns(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        meta.response_code = answer.response_code;
        meta.authentic_data = answer.authentic_data && request.metadata.authentic_data;
        let age_records = |rs: &[Record]| -> Vec<Record> {
            rs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.saturating_sub(age);
                    r
                })
                .collect()
        };
        let (an, ns, ad);
        let (an, ns, ad) = if age == 0 {
            (&answer.answers, &answer.authorities, &answer.additionals)
        } else {
            an = age_records(&answer.answers);
            ns = age_records(&answer.authorities);
            ad = age_records(&answer.additionals);
            (&an, &ns, &ad)
        };
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let resp = builder.build(meta, an.iter(), ns.iter(), [], ad.iter());
        send(&mut handle, resp, &request.metadata).await
    }

    async fn handle<R: ResponseHandler>(&self, request: &Request, handle: R) -> ResponseInfo {
        let protocol = request.protocol();
        // Only standard queries; no NOTIFY/UPDATE/IQUERY through a sinkhole.
        if request.metadata.message_type != MessageType::Query {
            return self
                .send_error(request, handle, ResponseCode::FormErr)
                .await;
        }
        if request.metadata.op_code != OpCode::Query {
            self.count(Decision::Deny, "refused", protocol);
            return self.send_error(request, handle, ResponseCode::NotImp).await;
        }
        if let Some(edns) = &request.edns
            && edns.version() > 0
        {
            self.count(Decision::Deny, "malformed", protocol);
            return self
                .send_error(request, handle, ResponseCode::BADVERS)
                .await;
        }
        let queries = request.queries.queries();
        if queries.len() != 1 {
            // RFC 9619: exactly one question. Zero or several ⇒ FORMERR,
            // never forwarded.
            self.count(Decision::Deny, "malformed", protocol);
            self.audit_local_deny("", protocol, "malformed", "malformed_request")
                .await;
            return self
                .send_error(request, handle, ResponseCode::FormErr)
                .await;
        }
        let q = &queries[0];
        let qtype = q.query_type();
        let qclass = q.query_class();
        if qclass != DNSClass::IN
            || matches!(
                qtype,
                RecordType::AXFR | RecordType::IXFR | RecordType::OPT | RecordType::ANY
            )
        {
            // Zone transfers, meta types and other classes are refused.
            self.count(Decision::Deny, "refused", protocol);
            return self
                .send_error(request, handle, ResponseCode::Refused)
                .await;
        }
        let raw_name = q.name().to_string();
        let Some(host) = normalize_query_name(&raw_name) else {
            // Not a host name (root, IP spelling, bad bytes): the PEP may
            // always deny on its own.
            self.count(Decision::Deny, "invalid_name", protocol);
            self.audit_local_deny(
                &raw_name.chars().take(255).collect::<String>(),
                protocol,
                "invalid_name",
                "invalid_name",
            )
            .await;
            return self.send_sinkhole(request, handle, qtype).await;
        };
        let transport = if protocol == Protocol::Tcp {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let process = match &self.attributor {
            Some(a) => a.attribute(request.src(), protocol == Protocol::Tcp).await,
            None => ProcessIdentity::default(),
        };
        let req = self.dns_request(host, process, transport);
        let mut verdict = self.decide(&req).await;
        // The record is spooled before anything leaves the box; no record ⇒
        // no forward.
        if !verdict.outcome.decision.is_allow() {
            self.count(verdict.outcome.decision, verdict.cause, protocol);
            self.record_deny(self.finding(&req, &verdict)).await;
            return self.send_sinkhole(request, handle, qtype).await;
        }
        if let Err(e) = self.audit.record(self.finding(&req, &verdict)).await {
            tracing::warn!(error = %e, host = %req.host, "audit spool failed: sinkholing");
            self.metrics.audit_failures.inc();
            verdict = Verdict {
                outcome: PdpOutcome::fail_closed("audit_spool"),
                cause: "fail_closed",
                detail: "",
            };
        }
        self.count(verdict.outcome.decision, verdict.cause, protocol);
        if !verdict.outcome.decision.is_allow() {
            return self.send_sinkhole(request, handle, qtype).await;
        }

        self.serve_allowed(request, handle, &req.host, qtype, qclass)
            .await
    }

    /// Answer an allowed, audited query: from the answer cache, else from
    /// the upstreams (reporting the answer addresses as DNS-learned
    /// context and caching the answer).
    pub(crate) async fn serve_allowed<R: ResponseHandler>(
        &self,
        request: &Request,
        handle: R,
        host: &str,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> ResponseInfo {
        let dnssec_ok = request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let key = cache_key(host, u16::from(qtype), u16::from(qclass), dnssec_ok);
        let now = Instant::now();
        if let Some(hit) = self.cache.get(&key, now) {
            self.metrics.cache_hits.inc();
            let age = hit.age_secs(now);
            return self.send_answer(request, handle, &hit, age).await;
        }
        let question = question_wire(host, u16::from(qtype), u16::from(qclass));
        let raw = match self.forwarder.forward(&question, dnssec_ok).await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::debug!(host = %host, error = %e, "forward failed");
                self.metrics.upstream_errors.inc();
                return self
                    .send_error(request, handle, ResponseCode::ServFail)
                    .await;
            }
        };
        let msg = match Message::from_vec(&raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(host = %host, error = %e, "bad upstream answer");
                self.metrics.upstream_errors.inc();
                return self
                    .send_error(request, handle, ResponseCode::ServFail)
                    .await;
            }
        };
        self.metrics.forwarded.inc();
        if let Some(ctx) = &self.context {
            let (ips, ttl) = answer_ips(&msg.answers);
            ctx.report(host, ips, ttl);
        }
        let ttl = CachedAnswer::cacheable_ttl(&msg, self.cache.max_ttl);
        let answer = CachedAnswer::new(&msg, ttl.unwrap_or(0), now).with_wire(&raw, question.len());
        let info = self.send_answer(request, handle, &answer, 0).await;
        if ttl.is_some() {
            self.cache.insert(key, answer, now);
        }
        info
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    resp: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    req_meta: &Metadata,
) -> ResponseInfo {
    match handle.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "sending response failed");
            let mut meta = Metadata::response_from_request(req_meta);
            meta.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_server::proto::op::Header {
                metadata: meta,
                counts: Default::default(),
            })
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsSinkhole {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.handle(request, response_handle).await
    }
}
