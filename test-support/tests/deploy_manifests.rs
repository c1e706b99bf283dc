//! Static checks of everything under `deploy/` that a deployment depends on.
//!
//! * Kubernetes: the kustomize base is parsed file by file (always), and the
//!   base plus the dev/prod overlays are rendered with `kubectl kustomize` when
//!   kubectl is installed. Every rendering goes through the same structural
//!   checks (images, ports matching the binaries' and the funnel's defaults,
//!   probes, capabilities, users, secrets mounted as files, NetworkPolicy
//!   selectors) and, when `kubernetes-validate` (PyPI, bundles the official
//!   OpenAPI schemas) is installed, a strict schema validation.
//! * Compose file, Dockerfile targets and the default policy (compiled by the
//!   real policy compiler).
//! * Image builds only where a container engine answers (`docker info`).
//!
//! Anything that cannot run prints `SKIPPED: <reason>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The ports the binaries and the funnel use by default (pdp-service app.rs,
/// audit-service DEFAULT_LISTEN, pep-proxy main.rs, deploy/funnel.sh).
const PDP_GRPC: u64 = 7400;
const PDP_ADMIN: u64 = 7401;
const AUDIT_GRPC: u64 = 7410;
const PROXY_EXPLICIT: u64 = 7480;
const FUNNEL_PROXY_PORT: u64 = 7481;
const FUNNEL_DNS_PORT: u64 = 7453;
const EXEMPT_ID: u64 = 1337;
const SIDECAR_LABEL: &str = "secureops.io/sidecar";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in `{addr}`"))
}

fn env_map(c: &Value) -> BTreeMap<String, String> {
    arr(c, "/env")
        .iter()
        .map(|e| (s(e, "/name").to_owned(), s(e, "/value").to_owned()))
        .collect()
}

fn caps(c: &Value, which: &str) -> BTreeSet<String> {
    arr(c, &format!("/securityContext/capabilities/{which}"))
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| s(d, "/kind") == kind && s(d, "/metadata/name") == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(m) = selector.get("matchLabels").and_then(Value::as_object) else {
        return selector.get("matchExpressions").is_some();
    };
    m.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Resolves a named or numeric container port.
fn probe_port(c: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().unwrap_or("");
    arr(c, "/ports")
        .iter()
        .find(|p| s(p, "/name") == name)
        .and_then(|p| p.pointer("/containerPort").and_then(Value::as_u64))
        .unwrap_or_else(|| panic!("probe port `{name}` not declared by {}", s(c, "/name")))
}

/// Every container and init container of a pod spec.
fn containers(spec: &Value) -> Vec<&Value> {
    arr(spec, "/initContainers")
        .iter()
        .chain(arr(spec, "/containers"))
        .collect()
}

/// Hardening every workload container shares, plus secrets-as-files: every
/// token/key variable names a file inside a read-only mounted Secret.
fn check_container_baseline(kind_name: &str, spec: &Value, claims: &BTreeSet<&str>, c: &Value) {
    let name = s(c, "/name");
    let ctx = format!("{kind_name} container {name}");
    let image = s(c, "/image");
    let last = image.rsplit('/').next().unwrap_or("");
    assert!(
        last.contains(':') || image.contains('@'),
        "{ctx}: image `{image}` has no tag"
    );
    assert!(
        !image.ends_with(":latest"),
        "{ctx}: image `{image}` uses :latest"
    );
    assert_eq!(
        c.pointer("/securityContext/allowPrivilegeEscalation"),
        Some(&Value::Bool(false)),
        "{ctx}: allowPrivilegeEscalation must be false"
    );
    assert_eq!(
        c.pointer("/securityContext/readOnlyRootFilesystem"),
        Some(&Value::Bool(true)),
        "{ctx}: readOnlyRootFilesystem must be true"
    );
    assert!(
        caps(c, "drop").contains("ALL"),
        "{ctx}: must drop ALL capabilities"
    );
    let volumes: BTreeMap<&str, &Value> = arr(spec, "/volumes")
        .iter()
        .map(|v| (s(v, "/name"), v))
        .collect();
    for (k, v) in env_map(c) {
        let lower = k.to_ascii_lowercase();
        let secret_material =
            lower.contains("token") || lower.contains("key") || lower.contains("secret");
        if secret_material {
            assert!(
                v.starts_with('/'),
                "{ctx}: {k} must name a mounted file, not carry a value"
            );
        }
        if secret_material {
            let mount = arr(c, "/volumeMounts")
                .iter()
                .find(|m| v.starts_with(&format!("{}/", s(m, "/mountPath"))))
                .unwrap_or_else(|| panic!("{ctx}: {k}={v} is not inside any volumeMount"));
            let vol = volumes
                .get(s(mount, "/name"))
                .unwrap_or_else(|| panic!("{ctx}: volume {} undefined", s(mount, "/name")));
            assert!(
                vol.get("secret").is_some(),
                "{ctx}: {k}={v} must come from a Secret volume"
            );
            assert_eq!(
                mount.get("readOnly"),
                Some(&Value::Bool(true)),
                "{ctx}: secret mount must be readOnly"
            );
        }
    }
    for m in arr(c, "/volumeMounts") {
        let vname = s(m, "/name");
        let declared = volumes.contains_key(vname) || claims.contains(vname);
        assert!(declared, "{ctx}: volumeMount `{vname}` has no volume");
    }
}

fn check_probes(ctx: &str, c: &Value) {
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", ""),
    ] {
        let p = c
            .get(probe)
            .unwrap_or_else(|| panic!("{ctx}: {probe} missing"));
        let got = s(p, "/httpGet/path");
        if !path.is_empty() {
            assert_eq!(got, path, "{ctx}: {probe} path");
        }
        let port = probe_port(c, p.pointer("/httpGet/port").unwrap_or(&Value::Null));
        let metrics = port_of(
            env_map(c)
                .get("SECUREOPS_METRICS_LISTEN")
                .map(String::as_str)
                .unwrap_or(""),
        );
        assert_eq!(port, metrics, "{ctx}: {probe} must hit the ops listener");
        let listen = env_map(c)["SECUREOPS_METRICS_LISTEN"].clone();
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{ctx}: kubelet probes need the ops listener on the pod IP, got {listen}"
        );
    }
}

fn funnel_flag(args: &[Value], flag: &str) -> Vec<String> {
    args.iter()
        .filter_map(Value::as_str)
        .filter_map(|a| a.strip_prefix(&format!("{flag}=")))
        .map(str::to_owned)
        .collect()
}

/// The structural checks, on one rendering of the manifests.
fn check_k8s(docs: &[Value], what: &str) {
    let kinds: BTreeSet<String> = docs.iter().map(|d| s(d, "/kind").to_owned()).collect();
    for k in [
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(k), "{what}: no {k}");
    }
    for d in docs {
        assert!(
            !s(d, "/apiVersion").is_empty(),
            "{what}: document without apiVersion"
        );
        if matches!(s(d, "/kind"), "Deployment" | "StatefulSet") {
            let name = format!("{what} {}/{}", s(d, "/kind"), s(d, "/metadata/name"));
            let spec = d.pointer("/spec/template/spec").unwrap_or(&Value::Null);
            assert_eq!(
                s(spec, "/securityContext/seccompProfile/type"),
                "RuntimeDefault",
                "{name}: seccomp"
            );
            assert_eq!(
                spec.get("automountServiceAccountToken"),
                Some(&Value::Bool(false)),
                "{name}: no API token for SecureOps pods"
            );
            assert!(
                labels_match(
                    d.pointer("/spec/selector").unwrap_or(&Value::Null),
                    d.pointer("/spec/template/metadata/labels")
                        .unwrap_or(&Value::Null)
                ),
                "{name}: selector does not match the template"
            );
            let claims: BTreeSet<&str> = arr(d, "/spec/volumeClaimTemplates")
                .iter()
                .map(|t| s(t, "/metadata/name"))
                .collect();
            for c in containers(spec) {
                check_container_baseline(&name, spec, &claims, c);
            }
        }
    }

    // --- PDP
    let pdp = find(docs, "Deployment", "secureops-pdp");
    let spec = &pdp["spec"]["template"]["spec"];
    let pdp_labels = &pdp["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        spec.pointer("/securityContext/runAsNonRoot"),
        Some(&Value::Bool(true))
    );
    let c = containers(spec)[0];
    let env = env_map(c);
    assert_eq!(port_of(&env["SECUREOPS_LISTEN"]), PDP_GRPC);
    assert_eq!(port_of(&env["SECUREOPS_ADMIN_LISTEN"]), PDP_ADMIN);
    assert!(env.contains_key("SECUREOPS_ADMIN_TOKEN_FILE"));
    assert!(caps(c, "add").is_empty(), "pdp adds no capabilities");
    check_probes(&format!("{what} pdp"), c);
    let svc = find(docs, "Service", "secureops-pdp");
    assert!(labels_match(
        &serde_json::json!({"matchLabels": svc["spec"]["selector"]}),
        pdp_labels
    ));
    assert!(
        arr(svc, "/spec/ports")
            .iter()
            .any(|p| p["port"].as_u64() == Some(PDP_GRPC)),
        "pdp Service exposes {PDP_GRPC}"
    );
    let admin = find(docs, "Service", "secureops-pdp-admin");
    assert!(
        arr(admin, "/spec/ports")
            .iter()
            .all(|p| p["port"].as_u64() == Some(PDP_ADMIN)),
        "admin Service exposes only {PDP_ADMIN}"
    );
    assert!(
        arr(svc, "/spec/ports")
            .iter()
            .all(|p| p["port"].as_u64() != Some(PDP_ADMIN)),
        "the sidecar-facing Service must not expose the admin API"
    );
    let pdb = find(docs, "PodDisruptionBudget", "secureops-pdp");
    assert!(labels_match(&pdb["spec"]["selector"], pdp_labels));

    // --- audit
    let audit = find(docs, "StatefulSet", "secureops-audit");
    assert_eq!(audit["spec"]["replicas"].as_u64(), Some(1), "one sequencer");
    let spec = &audit["spec"]["template"]["spec"];
    let c = containers(spec)[0];
    let env = env_map(c);
    assert_eq!(port_of(&env["SECUREOPS_LISTEN"]), AUDIT_GRPC);
    check_probes(&format!("{what} audit"), c);
    let claim = arr(audit, "/spec/volumeClaimTemplates")
        .first()
        .unwrap_or_else(|| panic!("{what}: audit has no volumeClaimTemplates"));
    let claim_name = s(claim, "/metadata/name");
    let data_mount = arr(c, "/volumeMounts")
        .iter()
        .find(|m| s(m, "/name") == claim_name)
        .unwrap_or_else(|| panic!("{what}: PVC {claim_name} not mounted"));
    assert_eq!(s(data_mount, "/mountPath"), env["SECUREOPS_DATA_DIR"]);
    let gov = find(docs, "Service", s(audit, "/spec/serviceName"));
    assert_eq!(
        s(gov, "/spec/clusterIP"),
        "None",
        "governing Service is headless"
    );
    assert!(
        arr(gov, "/spec/ports")
            .iter()
            .any(|p| p["port"].as_u64() == Some(AUDIT_GRPC))
    );

    // --- agent pod template
    let agent = docs
        .iter()
        .find(|d| {
            s(d, "/kind") == "Deployment"
                && d.pointer(&format!(
                    "/spec/template/metadata/labels/{}",
                    SIDECAR_LABEL.replace('/', "~1")
                )) == Some(&Value::String("true".into()))
        })
        .unwrap_or_else(|| panic!("{what}: no Deployment labelled {SIDECAR_LABEL}=true"));
    let spec = &agent["spec"]["template"]["spec"];
    assert_eq!(spec.get("shareProcessNamespace"), Some(&Value::Bool(true)));
    let inits = arr(spec, "/initContainers");
    let funnel = &inits[0];
    assert_eq!(
        s(funnel, "/name"),
        "funnel",
        "the funnel is installed before anything runs"
    );
    assert_eq!(
        caps(funnel, "add"),
        BTreeSet::from(["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
        "funnel init: NET_ADMIN and NET_RAW only"
    );
    let fargs = arr(funnel, "/args");
    assert_eq!(fargs.first().and_then(Value::as_str), Some("install"));
    let proxy_port: u64 = funnel_flag(fargs, "--proxy-port")[0].parse().unwrap_or(0);
    let dns_port: u64 = funnel_flag(fargs, "--dns-port")[0].parse().unwrap_or(0);
    assert_eq!((proxy_port, dns_port), (FUNNEL_PROXY_PORT, FUNNEL_DNS_PORT));
    let ids = |flag: &str| -> BTreeSet<u64> {
        funnel_flag(fargs, flag)
            .iter()
            .flat_map(|l| l.split(',').map(|x| x.parse::<u64>().unwrap_or(u64::MAX)))
            .collect()
    };
    let exempt_uids = ids("--exempt-uid");
    let exempt_gids = ids("--exempt-gid");
    assert!(
        !exempt_uids.contains(&0),
        "root must never be exempt by UID"
    );
    let by_name = |n: &str| -> &Value {
        containers(spec)
            .into_iter()
            .find(|c| s(c, "/name") == n)
            .unwrap_or_else(|| panic!("{what}: agent pod has no container {n}"))
    };
    let uid = |c: &Value| {
        c.pointer("/securityContext/runAsUser")
            .and_then(Value::as_u64)
    };
    let gid = |c: &Value| {
        c.pointer("/securityContext/runAsGroup")
            .and_then(Value::as_u64)
    };
    let mut metrics_ports = BTreeSet::new();
    for n in ["proxy", "dns", "sensor"] {
        let c = by_name(n);
        let ctx = format!("{what} agent sidecar {n}");
        assert_eq!(s(c, "/restartPolicy"), "Always", "{ctx}: native sidecar");
        check_probes(&ctx, c);
        let env = env_map(c);
        assert!(
            metrics_ports.insert(port_of(&env["SECUREOPS_METRICS_LISTEN"])),
            "{ctx}: ops port collides with another sidecar (one network namespace)"
        );
        let exempt = uid(c).is_some_and(|u| exempt_uids.contains(&u))
            || gid(c).is_some_and(|g| exempt_gids.contains(&g));
        assert!(
            exempt,
            "{ctx}: must run as an exempt UID/GID to reach the PDP"
        );
        assert!(
            env.get("SECUREOPS_PDP")
                .is_some_and(|p| p.ends_with(&format!(":{PDP_GRPC}"))),
            "{ctx}: PDP endpoint"
        );
    }
    let proxy = by_name("proxy");
    let penv = env_map(proxy);
    assert_eq!(
        port_of(&penv["SECUREOPS_TRANSPARENT_LISTEN"]),
        FUNNEL_PROXY_PORT
    );
    assert_eq!(port_of(&penv["SECUREOPS_LISTEN"]), PROXY_EXPLICIT);
    assert!(penv["SECUREOPS_AUDIT"].ends_with(&format!(":{AUDIT_GRPC}")));
    let dns = by_name("dns");
    assert_eq!(port_of(&env_map(dns)["SECUREOPS_LISTEN"]), FUNNEL_DNS_PORT);
    assert!(
        env_map(dns).contains_key("SECUREOPS_UPSTREAM"),
        "{what}: without an upstream every allowed name gets SERVFAIL"
    );
    for c in [proxy, dns] {
        // Either the brief's unprivileged sidecar (UID 1337, no capabilities)
        // or, with the process-attribution component, UID 0 holding only
        // SYS_PTRACE and exempt by GID.
        let added = caps(c, "add");
        if added.is_empty() {
            assert_eq!(uid(c), Some(EXEMPT_ID), "{what}: proxy/dns UID");
            assert_eq!(
                c.pointer("/securityContext/runAsNonRoot"),
                Some(&Value::Bool(true))
            );
        } else {
            assert_eq!(
                added,
                BTreeSet::from(["SYS_PTRACE".to_owned()]),
                "{what}: proxy/dns may add SYS_PTRACE only"
            );
            assert!(
                gid(c).is_some_and(|g| exempt_gids.contains(&g)),
                "{what}: a root proxy/dns must be exempt by GID"
            );
        }
    }
    let sensor = by_name("sensor");
    let sensor_caps = caps(sensor, "add");
    assert!(
        sensor_caps.contains("SYS_ADMIN"),
        "fanotify needs SYS_ADMIN"
    );
    assert!(
        sensor_caps.is_subset(&BTreeSet::from([
            "SYS_ADMIN".to_owned(),
            "SYS_PTRACE".to_owned()
        ])),
        "sensor capabilities beyond SYS_ADMIN/SYS_PTRACE: {sensor_caps:?}"
    );
    let workload = by_name("agent");
    let wuid = uid(workload).unwrap_or(0);
    let wgid = gid(workload).unwrap_or(0);
    assert!(
        wuid != 0 && !exempt_uids.contains(&wuid),
        "agent UID must not be exempt"
    );
    assert!(
        wgid != 0 && !exempt_gids.contains(&wgid),
        "agent GID must not be exempt"
    );
    assert!(
        caps(workload, "add").is_empty(),
        "agent gets no capabilities"
    );
    assert!(
        spec.pointer("/securityContext/fsGroup").is_none(),
        "a pod-wide fsGroup would hand every container an extra group"
    );

    // --- NetworkPolicies
    let audit_labels = &audit["spec"]["template"]["metadata"]["labels"];
    let agent_labels = &agent["spec"]["template"]["metadata"]["labels"];
    let nps: Vec<&Value> = docs
        .iter()
        .filter(|d| s(d, "/kind") == "NetworkPolicy")
        .collect();
    assert!(
        nps.iter()
            .any(|n| n["spec"]["podSelector"] == serde_json::json!({})
                && arr(n, "/spec/ingress").is_empty()
                && arr(n, "/spec/policyTypes").contains(&Value::String("Ingress".into()))),
        "{what}: default-deny ingress policy missing"
    );
    // For each protected port: which peers may reach it.
    let peers_for = |labels: &Value, port: u64| -> Vec<&Value> {
        nps.iter()
            .filter(|n| labels_match(&n["spec"]["podSelector"], labels))
            .flat_map(|n| arr(n, "/spec/ingress"))
            .filter(|r| {
                arr(r, "/ports")
                    .iter()
                    .any(|p| p["port"].as_u64() == Some(port))
            })
            .flat_map(|r| arr(r, "/from"))
            .collect()
    };
    for (labels, port) in [(pdp_labels, PDP_GRPC), (audit_labels, AUDIT_GRPC)] {
        let peers = peers_for(labels, port);
        assert!(!peers.is_empty(), "{what}: nothing may reach port {port}");
        for p in &peers {
            assert!(
                labels_match(&p["podSelector"], agent_labels)
                    && p["podSelector"]["matchLabels"][SIDECAR_LABEL] == "true"
                    && p["namespaceSelector"]["matchLabels"]["secureops.io/agents"] == "true",
                "{what}: port {port} open to a peer that is not a sidecar pod: {p}"
            );
        }
    }
    // The namespace the agent template is deployed to qualifies as an agents
    // namespace (otherwise its own sidecars would be cut off).
    if let Some(ns) = docs.iter().find(|d| s(d, "/kind") == "Namespace") {
        assert_eq!(
            ns["metadata"]["labels"]["secureops.io/agents"], "true",
            "{what}"
        );
    }
    let admin_peers = peers_for(pdp_labels, PDP_ADMIN);
    assert!(
        !admin_peers.is_empty(),
        "{what}: operators cannot reach the admin API"
    );
    for p in admin_peers {
        assert!(
            p.get("podSelector").is_none(),
            "admin: namespace-wide operator access"
        );
        assert_eq!(
            p["namespaceSelector"]["matchLabels"]["secureops.io/operator"], "true",
            "{what}: admin API open beyond the operator namespace: {p}"
        );
    }
}

fn kustomize_dirs() -> Vec<PathBuf> {
    let k8s = deploy().join("k8s");
    vec![
        k8s.join("base"),
        k8s.join("components/process-attribution"),
        k8s.join("overlays/dev"),
        k8s.join("overlays/prod"),
    ]
}

/// Every file a kustomization names exists (rendering would fail otherwise,
/// but this runs without kubectl too).
#[test]
fn deploy_kustomizations_reference_existing_files() {
    for dir in kustomize_dirs() {
        let k = &yaml_docs(&read(&dir.join("kustomization.yaml")), "kustomization")[0];
        let mut paths: Vec<&str> = arr(k, "/resources")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        paths.extend(arr(k, "/patches").iter().filter_map(|p| p["path"].as_str()));
        paths.extend(arr(k, "/components").iter().filter_map(Value::as_str));
        assert!(
            !paths.is_empty() || !arr(k, "/patches").is_empty(),
            "{}: empty kustomization",
            dir.display()
        );
        for p in paths {
            assert!(
                dir.join(p).exists(),
                "{}: {p} does not exist",
                dir.display()
            );
        }
    }
}

/// The raw base files, without kubectl: the checks that do not depend on
/// kustomize transformations.
#[test]
fn deploy_k8s_base_files_structure() {
    let base = deploy().join("k8s/base");
    let k = &yaml_docs(&read(&base.join("kustomization.yaml")), "kustomization")[0];
    let mut docs = Vec::new();
    for r in arr(k, "/resources").iter().filter_map(Value::as_str) {
        docs.extend(yaml_docs(&read(&base.join(r)), r));
    }
    check_k8s(&docs, "base (raw files)");
}

fn kustomize(dir: &Path) -> Option<String> {
    if !have("kubectl") {
        return None;
    }
    let out = Command::new("kubectl")
        .args(["kustomize", &dir.to_string_lossy()])
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rendered base and overlays: structure, secret references, and strict
/// validation against the Kubernetes OpenAPI schemas.
#[test]
fn deploy_k8s_rendered_overlays_validate() {
    if !have("kubectl") {
        eprintln!("SKIPPED: rendering overlays: kubectl (for `kubectl kustomize`) not installed");
        return;
    }
    let validator = have("kubernetes-validate");
    if !validator {
        eprintln!(
            "SKIPPED: schema validation: `kubernetes-validate` not installed \
             (pip install kubernetes-validate); structural checks still run"
        );
    }
    for dir in kustomize_dirs()
        .into_iter()
        .filter(|d| !d.ends_with("process-attribution"))
    {
        let what = dir
            .strip_prefix(deploy())
            .unwrap_or(&dir)
            .display()
            .to_string();
        let Some(rendered) = kustomize(&dir) else {
            return;
        };
        let docs = yaml_docs(&rendered, &what);
        check_k8s(&docs, &what);
        for d in &docs {
            if s(d, "/kind") != "Namespace" {
                assert_eq!(
                    s(d, "/metadata/namespace"),
                    "secureops",
                    "{what}: namespace"
                );
            }
        }
        // Secrets generated by an overlay must be the ones referenced
        // (kustomize renames them with a hash suffix).
        let secrets: BTreeSet<&str> = docs
            .iter()
            .filter(|d| s(d, "/kind") == "Secret")
            .map(|d| s(d, "/metadata/name"))
            .collect();
        if !secrets.is_empty() {
            for d in docs.iter().filter(|d| s(d, "/kind") != "Secret") {
                for v in arr(d, "/spec/template/spec/volumes") {
                    if let Some(name) = v.pointer("/secret/secretName").and_then(Value::as_str) {
                        assert!(
                            secrets.contains(name),
                            "{what}: Secret {name} not generated"
                        );
                    }
                }
            }
        }
        if validator {
            let file = std::env::temp_dir().join(format!(
                "secureops-k8s-{}-{}.yaml",
                std::process::id(),
                what.replace('/', "-")
            ));
            std::fs::write(&file, &rendered).unwrap_or_else(|e| panic!("write: {e}"));
            // 1.30: the oldest release with native sidecars GA-enabled by default.
            let out = Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", "1.30.0"])
                .arg(&file)
                .output()
                .unwrap_or_else(|e| panic!("kubernetes-validate: {e}"));
            let _ = std::fs::remove_file(&file);
            assert!(
                out.status.success(),
                "{what}: schema validation failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The dev overlay runs the audit service without the signing-key Secret
/// (key generated on its volume); prod keeps it.
#[test]
fn deploy_k8s_signing_key_handling() {
    let (Some(dev), Some(prod)) = (
        kustomize(&deploy().join("k8s/overlays/dev")),
        kustomize(&deploy().join("k8s/overlays/prod")),
    ) else {
        eprintln!("SKIPPED: signing key overlay check: kubectl not installed");
        return;
    };
    let key_env = |text: &str| -> Option<String> {
        let docs = yaml_docs(text, "overlay");
        let a = find(&docs, "StatefulSet", "secureops-audit");
        env_map(containers(&a["spec"]["template"]["spec"])[0])
            .get("SECUREOPS_SIGNING_KEY")
            .cloned()
    };
    assert_eq!(key_env(&dev), None);
    assert_eq!(
        key_env(&prod).as_deref(),
        Some("/etc/secureops/audit-key/audit.key")
    );
}

#[test]
fn deploy_compose_file_structure() {
    let path = deploy().join("compose.yaml");
    let doc = &yaml_docs(&read(&path), "compose.yaml")[0];
    let svc = |n: &str| -> &Value {
        doc.pointer(&format!("/services/{n}"))
            .unwrap_or_else(|| panic!("compose: service {n} missing"))
    };
    for n in [
        "pdp",
        "audit",
        "sidecar",
        "sidecar-dns",
        "funnel-init",
        "agent",
    ] {
        let _ = svc(n);
    }
    let dockerfile = read(&deploy().join("Dockerfile"));
    let targets = dockerfile_targets(&dockerfile);
    for (name, v) in doc["services"].as_object().into_iter().flatten() {
        if let Some(t) = v.pointer("/build/target").and_then(Value::as_str) {
            assert!(
                targets.contains(t),
                "compose {name}: Dockerfile target {t} missing"
            );
            assert_eq!(s(v, "/build/dockerfile"), "deploy/Dockerfile");
        }
    }
    // The agent lives in the sidecar's network namespace, after the funnel.
    for n in ["agent", "sidecar-dns", "funnel-init"] {
        assert_eq!(s(svc(n), "/network_mode"), "service:sidecar", "{n}");
    }
    assert_eq!(
        s(svc("agent"), "/depends_on/funnel-init/condition"),
        "service_completed_successfully"
    );
    let funnel = svc("funnel-init");
    let cap_add: BTreeSet<&str> = arr(funnel, "/cap_add")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(cap_add, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));
    assert!(arr(funnel, "/cap_drop").contains(&Value::String("ALL".into())));
    assert_eq!(s(funnel, "/restart"), "no", "one-shot");
    let cmd: Vec<&str> = arr(funnel, "/command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(cmd.first(), Some(&"install"));
    let ids = |flag: &str| -> BTreeSet<String> {
        cmd.iter()
            .filter_map(|a| a.strip_prefix(&format!("{flag}=")))
            .flat_map(|l| l.split(',').map(str::to_owned))
            .collect()
    };
    let exempt_uids = ids("--exempt-uid");
    let exempt_gids = ids("--exempt-gid");
    for n in ["sidecar", "sidecar-dns"] {
        let user = s(svc(n), "/user");
        let (u, g) = user.split_once(':').unwrap_or((user, ""));
        let added: BTreeSet<&str> = arr(svc(n), "/cap_add")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            exempt_uids.contains(u) || exempt_gids.contains(g),
            "{n} ({user}) must run as an exempt UID or GID"
        );
        assert!(
            added.is_subset(&BTreeSet::from(["SYS_PTRACE"])),
            "{n}: capabilities {added:?}"
        );
        assert!(
            arr(svc(n), "/cap_drop").contains(&Value::String("ALL".into())),
            "{n}: drop ALL"
        );
        assert_eq!(
            svc(n)["read_only"],
            Value::Bool(true),
            "{n}: read-only rootfs"
        );
    }
    let agent_user = s(svc("agent"), "/user");
    let agent_uid = agent_user.split(':').next().unwrap_or("");
    let agent_gid = agent_user.split(':').nth(1).unwrap_or("");
    assert!(
        !exempt_gids.contains(agent_gid),
        "agent GID must not be exempt"
    );
    assert!(
        !agent_uid.is_empty() && agent_uid != "0" && !exempt_uids.contains(agent_uid),
        "agent user `{agent_user}` must be neither root nor exempt"
    );
    let env = |n: &str, k: &str| s(svc(n), &format!("/environment/{k}")).to_owned();
    assert_eq!(
        port_of(&env("sidecar", "SECUREOPS_TRANSPARENT_LISTEN")),
        FUNNEL_PROXY_PORT
    );
    assert_eq!(port_of(&env("sidecar", "SECUREOPS_LISTEN")), PROXY_EXPLICIT);
    assert_eq!(
        port_of(&env("sidecar-dns", "SECUREOPS_LISTEN")),
        FUNNEL_DNS_PORT
    );
    assert!(
        !env("sidecar-dns", "SECUREOPS_UPSTREAM").is_empty(),
        "sinkhole upstream"
    );
    assert_eq!(port_of(&env("pdp", "SECUREOPS_LISTEN")), PDP_GRPC);
    assert_eq!(port_of(&env("pdp", "SECUREOPS_ADMIN_LISTEN")), PDP_ADMIN);
    assert_eq!(port_of(&env("audit", "SECUREOPS_LISTEN")), AUDIT_GRPC);
    assert_eq!(
        env("sidecar", "SECUREOPS_PDP"),
        format!("http://pdp:{PDP_GRPC}")
    );
    // Secrets are files that exist, referenced by *_FILE variables.
    for (name, sec) in doc["secrets"].as_object().into_iter().flatten() {
        let file = deploy().join(s(sec, "/file"));
        assert!(
            file.exists(),
            "compose secret {name}: {} missing",
            file.display()
        );
    }
    for (name, v) in doc["services"].as_object().into_iter().flatten() {
        for (k, val) in v["environment"].as_object().into_iter().flatten() {
            if k.contains("TOKEN") {
                let val = val.as_str().unwrap_or("");
                assert!(
                    val.starts_with("/run/secrets/"),
                    "compose {name}: {k} not a secret file"
                );
                let secret = val.trim_start_matches("/run/secrets/");
                assert!(
                    arr(v, "/secrets").contains(&Value::String(secret.into())),
                    "compose {name}: secret {secret} not attached"
                );
            }
        }
    }
}

fn dockerfile_targets(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()?.eq_ignore_ascii_case("FROM")).then_some(())?;
            let _image = w.next()?;
            w.next()?.eq_ignore_ascii_case("AS").then_some(())?;
            w.next().map(str::to_owned)
        })
        .collect()
}

/// Binary names declared by the workspace's Cargo.toml files.
fn workspace_bins() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut packages = BTreeSet::new();
    let mut bins = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(repo()) else {
        return (packages, bins);
    };
    for e in entries.flatten() {
        let toml = e.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&toml) else {
            continue;
        };
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_owned();
            } else if let Some(v) = line.strip_prefix("name") {
                let v = v
                    .trim_start()
                    .trim_start_matches('=')
                    .trim()
                    .trim_matches('"');
                match section.as_str() {
                    "[package]" => {
                        packages.insert(v.to_owned());
                    }
                    "[[bin]]" => {
                        bins.insert(v.to_owned());
                    }
                    _ => {}
                }
            }
        }
    }
    (packages, bins)
}

#[test]
fn deploy_dockerfile_targets_and_packages() {
    let text = read(&deploy().join("Dockerfile"));
    assert!(
        text.contains("ARG BASE_IMAGE=rust:"),
        "builder base is a rust:* image"
    );
    assert!(text.contains("ARG RUNTIME_IMAGE="));
    assert!(text.contains("FROM ${BASE_IMAGE} AS builder"));
    assert!(text.contains("FROM ${RUNTIME_IMAGE} AS runtime"));
    let targets = dockerfile_targets(&text);
    for t in [
        "builder", "runtime", "pdp", "audit", "proxy", "dns", "sensor", "cli", "funnel",
    ] {
        assert!(targets.contains(t), "Dockerfile target {t} missing");
    }
    // Packages built and binaries copied exist in the workspace.
    let (packages, bins) = workspace_bins();
    for w in text.split_whitespace().collect::<Vec<_>>().windows(2) {
        if w[0] == "-p" && w[1].starts_with("secureops") {
            assert!(
                packages.contains(w[1]),
                "Dockerfile builds unknown package {}",
                w[1]
            );
        }
        if let Some(bin) = w[0].strip_prefix("/out/secureops") {
            let bin = format!("secureops{bin}");
            assert!(
                bins.contains(&bin),
                "Dockerfile copies unknown binary {bin}"
            );
        }
    }
    // Every runtime stage ends up as a non-root user, except the sensor (UID 0,
    // documented) and the funnel init image (root with NET_ADMIN only).
    let mut stage = String::new();
    let mut users: BTreeMap<String, String> = BTreeMap::new();
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() == Some(&"FROM") {
            stage = w.get(3).map(|x| x.to_string()).unwrap_or_default();
            if let Some(parent) = w.get(1)
                && let Some(u) = users.get(*parent).cloned()
            {
                users.insert(stage.clone(), u);
            }
        } else if w.first() == Some(&"USER") {
            users.insert(stage.clone(), w.get(1).unwrap_or(&"").to_string());
        }
    }
    for t in ["pdp", "audit", "proxy", "dns", "cli"] {
        let u = users.get(t).map(String::as_str).unwrap_or("root");
        assert!(
            !u.starts_with("0") && u != "root",
            "target {t} runs as `{u}`"
        );
    }
    assert_eq!(users.get("proxy").map(String::as_str), Some("1337:1337"));
    assert_eq!(users.get("dns").map(String::as_str), Some("1337:1337"));
    let ignore = read(&deploy().join("Dockerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "target/ excluded from the context"
    );
}

/// Builds the images where a container engine answers.
#[test]
fn deploy_image_builds() {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match engine {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: image builds: no container engine reachable (`docker info`: {})",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: image builds: docker CLI not available ({e})");
            return;
        }
    }
    for t in ["funnel", "pdp", "audit", "proxy", "dns", "sensor", "cli"] {
        let out = Command::new("docker")
            .args(["build", "-f", "deploy/Dockerfile", "--target", t, "-t"])
            .arg(format!("secureops/{t}:test"))
            .arg(".")
            .current_dir(repo())
            .output()
            .unwrap_or_else(|e| panic!("docker build: {e}"));
        assert!(
            out.status.success(),
            "docker build --target {t} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Quoted strings of the sensor's DEFAULT_SENSITIVE_GLOBS, read from source so
/// this test does not need to link the sensor.
fn sensor_default_globs() -> Option<Vec<String>> {
    let text = std::fs::read_to_string(repo().join("context-sensor/src/globs.rs")).ok()?;
    let start = text.find("DEFAULT_SENSITIVE_GLOBS")?;
    let body = &text[start..];
    let body = &body[body.find('[')?..body.find("];")?];
    Some(
        body.split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, g)| g.to_owned())
            .collect(),
    )
}

#[test]
fn deploy_default_policy() {
    let text = read(&deploy().join("policies/default.yaml"));
    // The real compiler: every error located, none expected.
    if let Err(errs) = secureops_policy::policy::Policy::compile(&text) {
        panic!("deploy/policies/default.yaml does not compile: {errs:?}");
    }
    let doc = &yaml_docs(&text, "default policy")[0];
    assert_eq!(doc["version"].as_u64(), Some(1));
    assert_eq!(s(doc, "/default"), "deny");
    assert_eq!(s(doc, "/mode"), "enforce");
    let allow: BTreeSet<&str> = arr(doc, "/egress_allowlist")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for h in [
        "github.com",
        "*.githubusercontent.com",
        "pypi.org",
        "files.pythonhosted.org",
        "crates.io",
        "static.crates.io",
        "index.crates.io",
        "registry.npmjs.org",
    ] {
        assert!(allow.contains(h), "allowlist lacks {h}");
    }
    let taint = arr(doc, "/rules")
        .iter()
        .find(|r| s(r, "/id") == "tainted-after-credential-read")
        .unwrap_or_else(|| panic!("taint rule missing"));
    assert_eq!(s(taint, "/action"), "deny");
    assert!(!s(taint, "/when/within").is_empty());
    let globs: BTreeSet<&str> = arr(taint, "/when/process_or_ancestor_opened")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    match sensor_default_globs() {
        Some(sensor) if !sensor.is_empty() => {
            for g in &sensor {
                assert!(
                    globs.contains(g.as_str()),
                    "sensor reports {g} but the default policy's taint rule ignores it"
                );
            }
        }
        _ => eprintln!(
            "SKIPPED: sensor glob cross-check: DEFAULT_SENSITIVE_GLOBS not found in \
             context-sensor/src/globs.rs"
        ),
    }
    for g in ["**/.env*", "**/.aws/credentials", "**/.ssh/id_*"] {
        assert!(globs.contains(g), "taint rule lacks {g}");
    }
}

/// Image repository -> the binary it runs.
const IMAGE_BINARIES: &[(&str, &str)] = &[
    ("secureops/pdp", "secureops-pdp"),
    ("secureops/audit", "secureops-audit"),
    ("secureops/proxy", "secureops-proxy"),
    ("secureops/dns", "secureops-dns"),
    ("secureops/sensor", "secureops-sensor"),
];

/// Every `SECUREOPS_*` variable the manifests and the compose file set is one
/// the binary accepts (clap prints `[env: NAME=]` in `--help`): a renamed flag
/// would otherwise be silently ignored in production.
#[test]
fn deploy_env_vars_known_to_binaries() {
    let mut wanted: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let base = deploy().join("k8s/base");
    let k = &yaml_docs(&read(&base.join("kustomization.yaml")), "kustomization")[0];
    for r in arr(k, "/resources").iter().filter_map(Value::as_str) {
        for d in yaml_docs(&read(&base.join(r)), r) {
            for c in containers(d.pointer("/spec/template/spec").unwrap_or(&Value::Null)) {
                let image = s(c, "/image");
                let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
                if let Some((_, bin)) = IMAGE_BINARIES.iter().find(|(i, _)| *i == repo) {
                    wanted
                        .entry(bin)
                        .or_default()
                        .extend(env_map(c).into_keys());
                }
            }
        }
    }
    let compose = &yaml_docs(&read(&deploy().join("compose.yaml")), "compose")[0];
    for (_, svc) in compose["services"].as_object().into_iter().flatten() {
        let image = s(svc, "/image");
        let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
        if let Some((_, bin)) = IMAGE_BINARIES.iter().find(|(i, _)| *i == repo) {
            for (k, _) in svc["environment"].as_object().into_iter().flatten() {
                wanted.entry(bin).or_default().insert(k.clone());
            }
        }
    }
    assert_eq!(
        wanted.len(),
        IMAGE_BINARIES.len(),
        "every image is deployed somewhere"
    );
    for (bin, vars) in wanted {
        let path = secureops_test_support::bin_path(bin);
        if !path.exists() {
            eprintln!("SKIPPED: env check for {bin}: {} not built", path.display());
            continue;
        }
        let out = Command::new(&path)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("{bin} --help: {e}"));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin} --help failed");
        for v in vars.iter().filter(|v| v.starts_with("SECUREOPS_")) {
            assert!(
                help.contains(&format!("env: {v}=")),
                "{bin} does not accept {v} (not in --help)"
            );
        }
    }
}

/// Both overlays turn on process attribution (the taint rule needs a PID).
#[test]
fn deploy_k8s_overlays_enable_attribution() {
    for o in ["dev", "prod"] {
        let Some(text) = kustomize(&deploy().join(format!("k8s/overlays/{o}"))) else {
            eprintln!("SKIPPED: attribution overlay check: kubectl not installed");
            return;
        };
        let docs = yaml_docs(&text, o);
        let agent = find(&docs, "Deployment", "agent-example");
        for n in ["proxy", "dns"] {
            let c = containers(&agent["spec"]["template"]["spec"])
                .into_iter()
                .find(|c| s(c, "/name") == n)
                .unwrap_or_else(|| panic!("{o}: no {n}"));
            assert!(
                caps(c, "add").contains("SYS_PTRACE"),
                "{o}: {n} cannot attribute"
            );
            assert_eq!(
                caps(c, "drop"),
                BTreeSet::from(["ALL".to_owned()]),
                "{o}: {n}"
            );
        }
    }
}

/// The builder image's Rust is new enough for every locked dependency's
/// `rust-version` (read from the local cargo registry sources).
#[test]
fn deploy_builder_rust_is_new_enough() {
    let text = read(&deploy().join("Dockerfile"));
    let Some(tag) = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG BASE_IMAGE=rust:"))
    else {
        panic!("ARG BASE_IMAGE=rust:<version>-... missing");
    };
    let ver = |s: &str| -> (u32, u32) {
        let mut it = s.split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let base = ver(tag);
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let Ok(indexes) = std::fs::read_dir(cargo_home.join("registry/src")) else {
        eprintln!("SKIPPED: builder Rust check: no cargo registry sources");
        return;
    };
    let srcs: Vec<PathBuf> = indexes.flatten().map(|e| e.path()).collect();
    let lock = read(&repo().join("Cargo.lock"));
    let mut checked = 0;
    let mut need = ((0, 0), String::new());
    for pkg in lock.split("[[package]]") {
        let field = |k: &str| {
            pkg.lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        let (Some(name), Some(version), Some(_)) =
            (field("name"), field("version"), field("source"))
        else {
            continue;
        };
        for src in &srcs {
            let Ok(toml) =
                std::fs::read_to_string(src.join(format!("{name}-{version}/Cargo.toml")))
            else {
                continue;
            };
            checked += 1;
            if let Some(rv) = toml
                .lines()
                .find_map(|l| l.strip_prefix("rust-version = \""))
                .map(|v| ver(v.trim_end_matches('"')))
                && rv > need.0
            {
                need = (rv, format!("{name} {version}"));
            }
            break;
        }
    }
    if checked == 0 {
        eprintln!("SKIPPED: builder Rust check: locked packages not in the registry sources");
        return;
    }
    assert!(
        base >= need.0,
        "BASE_IMAGE rust:{tag} is older than {}.{} required by {}",
        need.0.0,
        need.0.1,
        need.1
    );
}
