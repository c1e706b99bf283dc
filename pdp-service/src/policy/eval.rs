//! Compilation and evaluation.

use std::time::Duration;

use super::context::ContextView;
use super::parse::Doc;
use super::{CacheScope, DefaultAction, EvalRequest, Evaluation, Mode, PolicyError, Verdict};

pub(crate) struct Compiled {
    pub(crate) mode: Mode,
    pub(crate) default: DefaultAction,
    pub(crate) require_sensor: bool,
    pub(crate) max_window: Option<Duration>,
    pub(crate) source: String,
}

pub(crate) fn compile(_doc: Doc, source: &str) -> Result<Compiled, Vec<PolicyError>> {
    Ok(Compiled {
        mode: Mode::Enforce,
        default: DefaultAction::Deny,
        require_sensor: false,
        max_window: None,
        source: source.to_owned(),
    })
}

impl Compiled {
    pub(crate) fn rule_count(&self) -> usize {
        0
    }
    pub(crate) fn host_may_match(&self, _host: &str, _port: u16) -> bool {
        false
    }
    pub(crate) fn evaluate(&self, _req: &EvalRequest<'_>, _ctx: &dyn ContextView) -> Evaluation {
        Evaluation {
            verdict: Verdict::Deny,
            reason: "default_deny".into(),
            rule_id: None,
            context_dependent: false,
            cache_scope: CacheScope::None,
            cache_ttl: Duration::ZERO,
            would_deny: false,
            normalized_host: None,
        }
    }
}
