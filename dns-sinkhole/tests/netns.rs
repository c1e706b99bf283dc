//! getaddrinfo through the system resolver, inside a network namespace whose
//! resolv.conf points at the sinkhole.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::process::Command;

use common::{Sinkhole, Upstream};

/// Deletes the namespace and its /etc/netns directory on drop.
struct Netns {
    name: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn create_netns() -> Result<Netns, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let name = format!("sodns{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !ok.success() {
        return Err("`ip netns add` failed".into());
    }
    let ns = Netns { name };
    let ok = Command::new("ip")
        .args(["-n", &ns.name, "link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !ok.success() {
        return Err("cannot bring lo up in the namespace".into());
    }
    // getaddrinfo(AI_ADDRCONFIG), as used by `getent ahosts`, only asks DNS
    // for IPv4 when an address other than 127.0.0.1 is configured: give lo
    // one, as a workload namespace would have on its interface.
    let ok = Command::new("ip")
        .args(["-n", &ns.name, "addr", "add", "10.255.0.1/32", "dev", "lo"])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !ok.success() {
        return Err("cannot add an address in the namespace".into());
    }
    std::fs::create_dir_all(format!("/etc/netns/{}", ns.name)).map_err(|e| e.to_string())?;
    std::fs::write(
        format!("/etc/netns/{}/resolv.conf", ns.name),
        "nameserver 127.0.0.1\noptions timeout:2 attempts:1\n",
    )
    .map_err(|e| e.to_string())?;
    Ok(ns)
}

/// Bind the test upstream's sockets inside the namespace (from a thread
/// that joined it), so that all test traffic stays in the namespace.
fn bind_in(ns: &str) -> Result<(UdpSocket, TcpListener), String> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let tcp = TcpListener::bind(udp.local_addr().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        Ok((udp, tcp))
    })
    .join()
    .map_err(|_| "bind thread panicked".to_string())?
}

fn getent(ns: &str, db: &str, name: &str) -> (i32, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "getent", db, name])
        .output()
        .expect("run getent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn getaddrinfo_in_a_netns_resolves_allowed_and_sinkholes_denied() {
    let ns = match create_netns() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED: network namespace unavailable: {why}");
            return;
        }
    };
    let (udp, tcp) = match bind_in(&ns.name) {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED: cannot enter the network namespace: {why}");
            return;
        }
    };
    let up = Upstream::start_on(udp, tcp);
    let upstream = up.addr.to_string();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.name,
        env!("CARGO_BIN_EXE_secureops-dns"),
    ]);
    let _s = Sinkhole::spawn_cmd(
        cmd,
        &[
            "--listen",
            "127.0.0.1:53",
            "--upstream",
            &upstream,
            "--allow",
            "allowed.test",
            "--allow",
            "*.wild.test",
        ],
    );

    let (code, out) = getent(&ns.name, "ahostsv4", "allowed.test");
    assert_eq!(code, 0, "getaddrinfo(allowed.test) failed: {out}");
    assert!(out.contains("192.0.2.1"), "{out}");
    let (code, out) = getent(&ns.name, "ahostsv4", "www.wild.test");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("192.0.2.1"), "{out}");
    // gethostbyname-style lookup through NSS as well.
    let (code, out) = getent(&ns.name, "hosts", "api.wild.test");
    assert_eq!(code, 0, "{out}");
    let forwarded = up.total();
    assert!(forwarded >= 2);

    for denied in ["evil.test", "wild.test", "allowed.test.evil"] {
        let (code, out) = getent(&ns.name, "ahostsv4", denied);
        assert_eq!(
            code, 2,
            "getaddrinfo({denied}) must fail with not found: {out}"
        );
        assert!(out.is_empty(), "{out}");
    }
    assert_eq!(
        up.total(),
        forwarded,
        "a denied name reached the upstream: {:?}",
        up.names.lock().unwrap()
    );
}
