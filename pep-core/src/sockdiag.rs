//! Exact TCP socket lookup through `NETLINK_SOCK_DIAG` (inet_diag).
//!
//! Why: `/proc/net/tcp{,6}` lists *every* socket of the namespace, so finding
//! one costs O(sockets) per connection; an `inet_diag` request for one exact
//! 4-tuple (no `NLM_F_DUMP`) is a hash lookup in the kernel. Any failure
//! (no netlink, old kernel, not found) returns `None` and the caller falls
//! back to `/proc/net`.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const REQ_LEN: usize = 56;
/// Offset of `idiag_inode` in `struct inet_diag_msg`.
const MSG_INODE_OFF: usize = 68;
const MSG_SOCKID_OFF: usize = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

/// `struct inet_diag_sockid` for (src = local, dst = remote).
fn sockid(local: SocketAddr, remote: SocketAddr, v6: bool) -> [u8; 48] {
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    let put = |dst: &mut [u8], ip: IpAddr| match (ip, v6) {
        (IpAddr::V4(a), false) => dst[0..4].copy_from_slice(&a.octets()),
        (IpAddr::V4(a), true) => dst.copy_from_slice(&a.to_ipv6_mapped().octets()),
        (IpAddr::V6(a), _) => dst.copy_from_slice(&a.octets()),
    };
    put(&mut id[4..20], local.ip());
    put(&mut id[20..36], remote.ip());
    // idiag_if = 0; cookie = INET_DIAG_NOCOOKIE
    id[40..48].copy_from_slice(&[0xff; 8]);
    id
}

/// Outcome of an exact lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found(u64),
    /// The kernel answered: no such socket in this network namespace.
    Absent,
    /// No answer (no netlink, timeout, unexpected reply).
    Failed,
}

#[cfg(test)]
/// Inode of the TCP socket whose local address is `local` and remote
/// address is `remote` (IPv4-mapped addresses are canonical IPv4 here).
pub(crate) fn tcp_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    match tcp_lookup(local, remote) {
        Lookup::Found(i) => Some(i),
        Lookup::Absent | Lookup::Failed => None,
    }
}

/// [`tcp_inode`], distinguishing "the kernel says absent" (so a `/proc/net`
/// scan of this namespace is pointless) from "no answer".
pub(crate) fn tcp_lookup(local: SocketAddr, remote: SocketAddr) -> Lookup {
    let both_v4 = local.is_ipv4() && remote.is_ipv4();
    let v4 = if both_v4 {
        match query(AF_INET, local, remote) {
            Lookup::Found(i) => return Lookup::Found(i),
            other => other,
        }
    } else {
        Lookup::Absent
    };
    // An AF_INET6 socket talking to an IPv4 peer uses mapped addresses.
    match (v4, query(AF_INET6, local, remote)) {
        (_, Lookup::Found(i)) => Lookup::Found(i),
        (Lookup::Absent, Lookup::Absent) => Lookup::Absent,
        _ => Lookup::Failed,
    }
}

fn query(family: u8, local: SocketAddr, remote: SocketAddr) -> Lookup {
    query_inner(family, local, remote).unwrap_or(Lookup::Failed)
}

fn query_inner(family: u8, local: SocketAddr, remote: SocketAddr) -> Option<Lookup> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000)).ok()?;
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    req.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: kernel assigns
    req.push(family);
    req.push(IPPROTO_TCP);
    req.push(0); // idiag_ext
    req.push(0); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&sockid(local, remote, family == AF_INET6));
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .ok()?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
    let msg = buf.get(..n)?;
    let ty = u16::from_ne_bytes([*msg.get(4)?, *msg.get(5)?]);
    let body = msg.get(NLMSG_HDRLEN..)?;
    if ty == NLMSG_ERROR {
        // struct nlmsgerr: int error (negative errno) first.
        let e = body.get(0..4)?;
        let errno = -i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
        return Some(if errno == libc::ENOENT {
            Lookup::Absent
        } else {
            Lookup::Failed
        });
    }
    if ty != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    // The answer must be the socket we asked for.
    let want = sockid(local, remote, family == AF_INET6);
    if body.get(MSG_SOCKID_OFF..MSG_SOCKID_OFF + 36)? != &want[..36] {
        return None;
    }
    let ino = body.get(MSG_INODE_OFF..MSG_INODE_OFF + 4)?;
    let inode = u32::from_ne_bytes([ino[0], ino[1], ino[2], ino[3]]);
    (inode != 0).then_some(Lookup::Found(u64::from(inode)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{Attributor, SocketKind};

    #[test]
    fn netlink_and_proc_agree() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(bind) else {
                continue;
            };
            let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (acc, peer) = l.accept().unwrap();
            let local = acc.local_addr().unwrap();
            let nl = tcp_inode(peer, local);
            let proc = Attributor::new().proc_socket_inode(SocketKind::Tcp, peer, Some(local));
            assert!(nl.is_some(), "netlink lookup for {bind}");
            assert_eq!(nl, proc, "{bind}");
            // the accepted (server) side is a different socket
            assert_ne!(tcp_inode(local, peer), nl);
            // A socket that does not exist is a definitive answer.
            let nowhere: SocketAddr = if peer.is_ipv4() {
                "127.0.0.1:1".parse().unwrap()
            } else {
                "[::1]:1".parse().unwrap()
            };
            assert_eq!(tcp_lookup(nowhere, local), Lookup::Absent, "{bind}");
        }
        assert_eq!(
            tcp_inode(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ),
            None
        );
    }
}
