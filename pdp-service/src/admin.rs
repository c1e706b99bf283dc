//! `PolicyAdmin`: the authenticated operator API (own listener; the bearer
//! token is checked by [`crate::auth::BearerAuth`] before these handlers run).

use std::sync::Arc;

use secureops_proto::v1::policy_admin_server::PolicyAdmin;
use secureops_proto::v1::{
    Escalation, GetRequest, HistoryRequest, HistoryResponse, Invalidation, ListEscalationsRequest,
    ListEscalationsResponse, PolicyError as PbPolicyError, PolicyVersion, PutRequest, PutResponse,
    ResolveEscalationRequest, RollbackRequest, ValidateRequest, ValidateResponse,
    invalidation::Kind,
};
use tonic::{Request, Response, Status};

use crate::escalation::ResolveError;
use crate::policy::PolicyError;
use crate::state::{AdminError, Pdp, PutOutcome};
use crate::store::{StoreError, VersionMeta};

/// Largest policy text accepted (the admin listener's message limit is a
/// little higher so this check produces the clearer error).
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// `PolicyAdmin` implementation.
#[derive(Debug, Clone)]
pub struct AdminService {
    pdp: Arc<Pdp>,
}

impl AdminService {
    /// New service over shared state.
    pub fn new(pdp: Arc<Pdp>) -> Self {
        AdminService { pdp }
    }
}

fn pb_errors(errs: Vec<PolicyError>) -> Vec<PbPolicyError> {
    errs.into_iter()
        .map(|e| PbPolicyError {
            line: e.line,
            column: e.column,
            rule_id: e.rule_id.unwrap_or_default(),
            message: e.message,
            path: e.path,
        })
        .collect()
}

fn check_size(yaml: &str) -> Result<(), Status> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(Status::invalid_argument(format!(
            "yaml: {} bytes exceeds the limit of {MAX_POLICY_BYTES}",
            yaml.len()
        )));
    }
    Ok(())
}

fn check_meta_text(field: &str, v: &str) -> Result<(), Status> {
    if v.len() > 4096 {
        return Err(Status::invalid_argument(format!(
            "{field}: longer than 4096 bytes"
        )));
    }
    Ok(())
}

fn admin_status(e: AdminError) -> Status {
    match e {
        AdminError::Store(StoreError::NotFound(v)) => {
            Status::not_found(format!("policy version {v} not found"))
        }
        AdminError::Store(e) => {
            tracing::error!(error = %e, "policy store failure");
            Status::internal(format!("policy store: {e}"))
        }
    }
}

fn version_pb(meta: VersionMeta, yaml: String, active: bool) -> PolicyVersion {
    PolicyVersion {
        version: meta.version,
        yaml,
        created_unix_ms: meta.created_unix_ms,
        author: meta.author,
        comment: meta.comment,
        sha256: meta.sha256,
        active,
    }
}

fn put_response(pdp: &Pdp, out: PutOutcome) -> Result<PutResponse, Status> {
    match out {
        PutOutcome::Accepted(meta) => Ok(PutResponse {
            accepted: true,
            version: meta.version,
            errors: Vec::new(),
        }),
        PutOutcome::Rejected(errs) => {
            tracing::warn!(
                errors = errs.len(),
                "policy refused; the running version keeps serving"
            );
            Ok(PutResponse {
                accepted: false,
                version: pdp.active_guard().version,
                errors: pb_errors(errs),
            })
        }
        PutOutcome::Conflict { active } => Err(Status::failed_precondition(format!(
            "expected_version does not match the active version {active}"
        ))),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("admin task failed: {e}")))
}

#[tonic::async_trait]
impl PolicyAdmin for AdminService {
    async fn validate(
        &self,
        request: Request<ValidateRequest>,
    ) -> Result<Response<ValidateResponse>, Status> {
        let r = request.into_inner();
        check_size(&r.yaml)?;
        let res = blocking(move || Pdp::validate(&r.yaml)).await?;
        Ok(Response::new(match res {
            Ok(p) => ValidateResponse {
                ok: true,
                errors: Vec::new(),
                rule_count: u32::try_from(p.rule_count()).unwrap_or(u32::MAX),
            },
            Err(errs) => ValidateResponse {
                ok: false,
                errors: pb_errors(errs),
                rule_count: 0,
            },
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = request.into_inner();
        check_size(&r.yaml)?;
        check_meta_text("author", &r.author)?;
        check_meta_text("comment", &r.comment)?;
        let pdp = Arc::clone(&self.pdp);
        let out = blocking(move || pdp.put(&r.yaml, &r.author, &r.comment, r.expected_version))
            .await?
            .map_err(admin_status)?;
        put_response(&self.pdp, out).map(Response::new)
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<PolicyVersion>, Status> {
        let v = request.into_inner().version;
        let pdp = Arc::clone(&self.pdp);
        let (text, meta, active) = blocking(move || pdp.get(v)).await?.map_err(admin_status)?;
        let version = if v == 0 {
            self.pdp.active_guard().version
        } else {
            v
        };
        let meta = Pdp::meta_or_builtin(meta, version, &text);
        Ok(Response::new(version_pb(meta, text, active)))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let active = self.pdp.active_guard().version;
        let versions = self
            .pdp
            .history(limit)
            .into_iter()
            .map(|m| {
                let is_active = m.version == active;
                version_pb(m, String::new(), is_active)
            })
            .collect();
        Ok(Response::new(HistoryResponse { versions }))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<PutResponse>, Status> {
        let r = request.into_inner();
        check_meta_text("author", &r.author)?;
        check_meta_text("comment", &r.comment)?;
        let pdp = Arc::clone(&self.pdp);
        let out = blocking(move || pdp.rollback(r.to_version, &r.author, &r.comment))
            .await?
            .map_err(admin_status)?;
        put_response(&self.pdp, out).map(Response::new)
    }

    async fn list_escalations(
        &self,
        request: Request<ListEscalationsRequest>,
    ) -> Result<Response<ListEscalationsResponse>, Status> {
        let r = request.into_inner();
        let escalations = self
            .pdp
            .escalations
            .list(r.include_resolved, &r.workload_id);
        Ok(Response::new(ListEscalationsResponse { escalations }))
    }

    async fn resolve_escalation(
        &self,
        request: Request<ResolveEscalationRequest>,
    ) -> Result<Response<Escalation>, Status> {
        let r = request.into_inner();
        if r.escalation_id.is_empty() {
            return Err(Status::invalid_argument("escalation_id: must not be empty"));
        }
        check_meta_text("comment", &r.comment)?;
        let e = self
            .pdp
            .escalations
            .resolve(
                &r.escalation_id,
                r.approve,
                r.ttl_seconds,
                r.all_ports,
                &r.comment,
            )
            .map_err(|e| match e {
                ResolveError::NotFound(_) => Status::not_found(e.to_string()),
                ResolveError::Expired(_) => Status::failed_precondition(e.to_string()),
            })?;
        tracing::info!(
            escalation = %e.id,
            workload = %e.workload_id,
            host = %e.host,
            port = e.port,
            approve = r.approve,
            "escalation resolved"
        );
        self.pdp.publish(Invalidation {
            kind: Kind::EscalationResolved as i32,
            workload_id: e.workload_id.clone(),
            host: e.host.clone(),
            port: e.port,
            escalation_id: e.id.clone(),
            ..Invalidation::default()
        });
        Ok(Response::new(e))
    }
}
