//! The operator CLI against a real PDP: validate with located errors, push,
//! history, rollback, check (exit codes), refused credentials, completions.

use secureops_e2e::*;

const GOOD: &str = "version: 1\ndefault: deny\negress_allowlist:\n  - github.com\n";
const GOOD2: &str = "version: 1\ndefault: deny\negress_allowlist:\n  - github.com\n  - pypi.org\n";
const BAD: &str = "version: 1\ndefault: deny\nrules:\n  - id: broken\n    action: allow\n    destinations:\n      - host: \"*\"\n        ports: [99999]\n";

#[test]
fn cli_against_a_real_pdp() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = write(tmp.path(), "good.yaml", GOOD);
    let good2 = write(tmp.path(), "good2.yaml", GOOD2);
    let bad = write(tmp.path(), "bad.yaml", BAD);
    let token = write(tmp.path(), "admin.token", "s3cret-admin-token\n");
    let pdp = Service::spawn(
        bin_path("secureops-pdp"),
        PdpArgs::new(tmp.path().join("pdp"))
            .admin_token_file(&token)
            .policy(&good)
            .build(),
        &["grpc", "admin"],
    )
    .expect("pdp starts");
    let env = vec![
        ("SECUREOPS_PDP", pdp.url("grpc")),
        ("SECUREOPS_ADMIN", pdp.url("admin")),
        ("SECUREOPS_ADMIN_TOKEN_FILE", token.display().to_string()),
    ];

    // Offline validation: every error located, exit 3.
    let v = cli(&["policy", "validate", &bad.display().to_string()], &[]);
    assert_eq!(v.status.code(), Some(3), "{v:?}");
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(
        err.contains(":7:") && err.contains("[rule broken]"),
        "bare * located: {err}"
    );
    assert!(err.contains(":8:"), "bad port located: {err}");
    let ok = cli(&["policy", "validate", &good.display().to_string()], &[]);
    assert!(ok.status.success(), "{ok:?}");

    // A refused push changes nothing; the old policy keeps answering.
    let push_bad = cli(&["policy", "push", &bad.display().to_string()], &env);
    assert_eq!(push_bad.status.code(), Some(3), "{push_bad:?}");
    let c = cli(&["check", "github.com:443"], &env);
    assert_eq!(c.status.code(), Some(0), "github.com allowed: {c:?}");
    let c = cli(&["check", "pypi.org:443"], &env);
    assert_eq!(c.status.code(), Some(3), "pypi.org denied: {c:?}");

    // Push, history, rollback.
    let p = cli(
        &[
            "policy",
            "push",
            &good2.display().to_string(),
            "--comment",
            "add pypi",
        ],
        &env,
    );
    assert!(p.status.success(), "{p:?}");
    let c = cli(&["check", "pypi.org:443", "--json"], &env);
    assert_eq!(
        c.status.code(),
        Some(0),
        "pypi.org allowed after push: {c:?}"
    );
    let j: serde_json::Value = serde_json::from_slice(&c.stdout).expect("json");
    assert_eq!(j["decision"], "allow");
    let h = cli(&["policy", "history", "--json"], &env);
    let hist: serde_json::Value = serde_json::from_slice(&h.stdout).expect("history json");
    let versions: Vec<u64> = hist
        .as_array()
        .map(|a| a.iter().filter_map(|v| v["version"].as_u64()).collect())
        .unwrap_or_default();
    assert!(versions.len() >= 2, "two versions in history: {hist}");
    let first = *versions.iter().min().expect("a version");
    let r = cli(&["policy", "rollback", &first.to_string()], &env);
    assert!(r.status.success(), "{r:?}");
    let c = cli(&["check", "pypi.org:443"], &env);
    assert_eq!(
        c.status.code(),
        Some(3),
        "pypi.org denied again after rollback: {c:?}"
    );

    // Wrong credential: refused, nothing changes.
    let wrong = write(tmp.path(), "wrong.token", "not-the-token");
    let mut env_wrong = env.clone();
    env_wrong[2] = ("SECUREOPS_ADMIN_TOKEN_FILE", wrong.display().to_string());
    let w = cli(
        &["policy", "push", &good2.display().to_string()],
        &env_wrong,
    );
    assert_eq!(w.status.code(), Some(1), "{w:?}");
    assert!(
        String::from_utf8_lossy(&w.stderr)
            .to_lowercase()
            .contains("unauthenticated"),
        "{w:?}"
    );

    // Offline what-if: the policy file evaluated against destinations.
    let t = cli(
        &[
            "policy",
            "test",
            &good.display().to_string(),
            "--dest",
            "github.com:443",
            "--dest",
            "evil.github.com.attacker.test",
            "--json",
        ],
        &[],
    );
    let tj: serde_json::Value = serde_json::from_slice(&t.stdout).expect("policy test json");
    assert_eq!(tj[0]["decision"], "allow", "{tj}");
    assert_eq!(tj[1]["decision"], "deny", "{tj}");

    let comp = cli(&["completions", "bash"], &[]);
    assert!(comp.status.success() && String::from_utf8_lossy(&comp.stdout).contains("secureops"));
}
