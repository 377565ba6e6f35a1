//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent (`mesh-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size assertion, so both
//! sides agree on the layout byte for byte.
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

mod inbound;

pub use inbound::{
    InboundDecision, InboundKey, PlaintextInbound, INBOUND_LISTENERS_CAPACITY,
    INBOUND_POLICY_CAPACITY, NODE_ADDRESSES_CAPACITY, TUNNEL_PORT,
};

/// Port of the agent's in-pod listener when none is configured.
pub const DEFAULT_LISTEN_PORT: u16 = 15001;

/// Socket mark the agent puts on its own upstream sockets in iptables mode, where the rules let
/// marked sockets pass. Spells "MESH" in ASCII. Any process with `CAP_NET_ADMIN` in its network
/// namespace can set it, so the eBPF programs do not trust it: they exempt the agent's sockets
/// by cookie ([`map_name::AGENT_SOCKETS`]).
pub const DEFAULT_AGENT_MARK: u32 = 0x4d45_5348;

/// Capacity of the map of the agent's own socket cookies. An entry lives from just before the
/// agent's `connect` to the hook that consumes it, so only connects in flight hold one; LRU
/// evicts what a socket closed before connecting left behind.
pub const AGENT_SOCKETS_CAPACITY: u32 = 8_192;

/// Capacity of the map keyed by socket cookie that `connect4` fills before the local port is
/// known. LRU: an entry whose connection never establishes is evicted eventually.
pub const PENDING_CAPACITY: u32 = 16_384;

/// Capacity of the original-destination map the agent reads after `accept`. Entries are removed
/// when the client socket closes; LRU bounds it even if a close is never seen.
pub const ORIGINAL_DST_CAPACITY: u32 = 65_536;

/// Capacity of the enrollment map: pods (network namespaces) one node can enroll.
pub const ENROLLED_CAPACITY: u32 = 4_096;

/// Names of the kernel maps, as the agent looks them up in the loaded object. The kernel side
/// defines each map under the same Rust name and checks it at compile time (`shared_name!` in
/// `mesh-ebpf`), so the two cannot drift apart.
pub mod map_name {
    /// Enrolled pods by network-namespace cookie ([`Enrollment`](super::Enrollment)).
    pub const ENROLLED: &str = "ENROLLED";
    /// Original destinations by socket cookie, before the connection is established.
    pub const PENDING: &str = "PENDING";
    /// Original destinations by [`ConnKey`](super::ConnKey): what the agent reads after `accept`.
    pub const ORIGINAL_DST: &str = "ORIGINAL_DST";
    /// Both ends of redirected connections, for the socket fast path.
    pub const SOCKETS: &str = "SOCKETS";
    /// Per-CPU counters, one per [`Decision`](super::Decision).
    pub const DECISIONS: &str = "DECISIONS";
    /// Cookies of the agent's own upstream sockets (`u64` → `u8`, LRU), written by the agent
    /// between `socket` and `connect`, consumed by `connect4`/`connect6`, which let each such
    /// socket pass once. Only a process with `CAP_BPF` or `CAP_SYS_ADMIN` in the initial user
    /// namespace can write it, so a pod cannot exempt its own sockets.
    pub const AGENT_SOCKETS: &str = "AGENT_SOCKETS";
    /// What plaintext arriving at each captured pod address and port meets
    /// ([`InboundKey`](super::InboundKey) → [`PlaintextInbound`](super::PlaintextInbound)).
    pub const INBOUND_POLICY: &str = "INBOUND_POLICY";
    /// The agent's inbound listener inside each captured pod, by pod address (sockhash).
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// The node's own addresses (`u32` → `u32`): connections from them (the kubelet's probes)
    /// reach pods uncaptured.
    pub const NODE_ADDRESSES: &str = "NODE_ADDRESSES";
    /// Per-CPU counters, one per [`InboundDecision`](super::InboundDecision).
    pub const INBOUND_DECISIONS: &str = "INBOUND_DECISIONS";
}

/// Names of the kernel programs (their function names in `mesh-ebpf`).
pub mod program_name {
    /// `cgroup/connect4`: the redirect decision.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `cgroup/connect6`: the same decision for IPv4-mapped destinations (`::ffff:a.b.c.d`)
    /// of dual-stack sockets; native IPv6 is counted and let through.
    pub const CONNECT6: &str = "mesh_connect6";
    /// `sockops`: moves the original destination to its final key once established.
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// `sk_msg` on the socket map: the socket fast path.
    pub const SK_MSG: &str = "mesh_sk_msg";
    /// `sk_lookup` on each captured pod's network namespace: inbound capture.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
}

/// Names of the kernel programs' globals that the loader sets before loading.
pub mod global_name {
    /// `u32`: 1 puts redirected connections on the socket fast path.
    pub const FAST_PATH: &str = "FAST_PATH";
}

/// Whether two names are equal, usable in constants: the kernel side asserts with it that each
/// map, program and global carries the name the agent looks it up by.
pub const fn names_match(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
const _: () = assert!(
    names_match("ENROLLED", map_name::ENROLLED)
        && !names_match("ENROLLED", "ENROLLEE")
        && !names_match("ENROLLED", "ENROLLED_")
);

/// Addresses as the kernel hands them to the connect hooks: an IPv4 address is a `u32` whose
/// memory holds the four bytes in network order; an IPv6 address is four such words. Native
/// byte order conversions keep the meaning the same on the eBPF target and on the host.
pub mod addr {
    /// The third word of every IPv4-mapped IPv6 address (`::ffff:0:0/96`).
    const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// `::1`.
    pub const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

    /// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), which a
    /// dual-stack socket connects to when it means IPv4; `None` for any other IPv6 address.
    pub const fn mapped_ip4(ip6: [u32; 4]) -> Option<u32> {
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED_PREFIX {
            Some(ip6[3])
        } else {
            None
        }
    }

    /// `::ffff:a.b.c.d` for the IPv4 address `ip4`.
    pub const fn mapped(ip4: u32) -> [u32; 4] {
        [0, 0, MAPPED_PREFIX, ip4]
    }

    /// Whether `ip4` is in 127.0.0.0/8.
    pub const fn is_loopback4(ip4: u32) -> bool {
        ip4.to_ne_bytes()[0] == 127
    }
}

/// What an enrolled pod's outbound connections are redirected to, inside the pod's own network
/// namespace. Addresses and ports are in network byte order, as the kernel hands them over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// IPv4 address of the agent's in-pod listener (network order), normally 127.0.0.1.
    pub listen_ip4: u32,
    /// Port of the agent's in-pod listener (network order, in the low 16 bits).
    pub listen_port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<Enrollment>() == 8);

/// The destination a redirected connection asked for. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    pub ip4: u32,
    /// Network order, in the low 16 bits.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<OriginalDst>() == 8);

/// Identifies a redirected connection as the agent sees it after `accept`: the pod's network
/// namespace and the client's local port (the peer port of the accepted socket, host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub client_port: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 16);

/// Capacity of the socket map of the fast path: both ends of every redirected connection (the
/// pod's socket and the agent's in-pod socket). A connection that finds it full takes the
/// ordinary loopback path.
pub const SOCKETS_CAPACITY: u32 = 65_536;

/// A socket on the fast path, as seen from that socket: its namespace, then its own and its
/// peer's address. Addresses in network order, ports in host order. The socket at the other end
/// of a redirected connection has the same key with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}
const _: () = assert!(size_of::<SockKey>() == 24);

impl SockKey {
    /// The key of the socket at the other end.
    pub const fn peer(self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Why the kernel programs let a connection through or redirected it; the index into the
/// per-CPU decision counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Rewritten to the agent's in-pod listener.
    Redirected = 0,
    /// The socket's network namespace is not enrolled.
    NotEnrolled = 1,
    /// Enrolled, but no agent listener exists in the pod (agent down or restarting): fail-open.
    AgentAbsent = 2,
    /// The agent's own socket: its cookie was in `AGENT_SOCKETS` (and is removed).
    AgentSocket = 3,
    /// Not TCP (UDP, for example).
    NotTcp = 4,
    /// A loopback destination: the pod talking to itself.
    Loopback = 5,
    /// The original destination could not be remembered (map full or error): fail-open.
    MapError = 6,
    /// A native IPv6 destination from an enrolled pod: not redirected (the agent listens on
    /// IPv4 only), a known bypass counted so it is never silent. IPv4-mapped destinations
    /// (`::ffff:a.b.c.d`) are redirected like IPv4; `::1` counts as [`Decision::Loopback`], and
    /// a pod that is not enrolled as [`Decision::NotEnrolled`].
    Ipv6Bypass = 7,
}

impl Decision {
    pub const COUNT: u32 = 8;
    pub const ALL: [Decision; Self::COUNT as usize] = [
        Decision::Redirected,
        Decision::NotEnrolled,
        Decision::AgentAbsent,
        Decision::AgentSocket,
        Decision::NotTcp,
        Decision::Loopback,
        Decision::MapError,
        Decision::Ipv6Bypass,
    ];

    /// Stable snake_case name, used in metrics and the admin API.
    pub const fn name(self) -> &'static str {
        match self {
            Decision::Redirected => "redirected",
            Decision::NotEnrolled => "not_enrolled",
            Decision::AgentAbsent => "agent_absent",
            Decision::AgentSocket => "agent_socket",
            Decision::NotTcp => "not_tcp",
            Decision::Loopback => "loopback",
            Decision::MapError => "map_error",
            Decision::Ipv6Bypass => "ipv6_bypass",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all four are `repr(C)`, made only of integers, with explicit padding and no
    // implicit gaps (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for Enrollment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OriginalDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InboundKey {}
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::addr::*;

    fn ip4(text: &str) -> u32 {
        u32::from_ne_bytes(text.parse::<Ipv4Addr>().unwrap().octets())
    }

    fn ip6(text: &str) -> [u32; 4] {
        let octets = text.parse::<Ipv6Addr>().unwrap().octets();
        core::array::from_fn(|i| u32::from_ne_bytes(octets[4 * i..4 * i + 4].try_into().unwrap()))
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_other_ipv6_ones_are_not() {
        assert_eq!(
            mapped_ip4(ip6("::ffff:10.96.0.30")),
            Some(ip4("10.96.0.30"))
        );
        assert_eq!(mapped_ip4(ip6("::ffff:127.0.0.1")), Some(ip4("127.0.0.1")));
        for native in [
            "fd00::1",
            "::1",
            "::",
            "::10.96.0.30",
            "64:ff9b::10.96.0.30",
            "::fffe:a60:1e",
        ] {
            assert_eq!(mapped_ip4(ip6(native)), None, "{native}");
        }
        assert_eq!(mapped(ip4("127.0.0.1")), ip6("::ffff:127.0.0.1"));
        assert_eq!(LOOPBACK6, ip6("::1"));
    }

    #[test]
    fn loopback_is_all_of_127_0_0_0_8() {
        assert!(is_loopback4(ip4("127.0.0.1")));
        assert!(is_loopback4(ip4("127.255.0.9")));
        assert!(!is_loopback4(ip4("10.77.0.127")));
        assert!(!is_loopback4(ip4("128.0.0.1")));
    }
}
