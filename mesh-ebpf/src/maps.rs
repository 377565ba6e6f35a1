//! Every map the kernel programs share with each other and with the agent.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
};
use mesh_common::{
    map_name, ConnKey, Decision, Enrollment, InboundDecision, InboundKey, OriginalDst, SockKey,
    AGENT_SOCKETS_CAPACITY, ENROLLED_CAPACITY, INBOUND_LISTENERS_CAPACITY,
    INBOUND_POLICY_CAPACITY, NODE_ADDRESSES_CAPACITY, ORIGINAL_DST_CAPACITY, PENDING_CAPACITY,
    SOCKETS_CAPACITY,
};

/// Enrolled pods, keyed by network-namespace cookie. Filled by the agent.
#[map]
pub static ENROLLED: HashMap<u64, Enrollment> = HashMap::with_max_entries(ENROLLED_CAPACITY, 0);
shared_name!(ENROLLED, map_name::ENROLLED);

/// Cookies of the agent's own upstream sockets, each let through once by `connect4`/`connect6`
/// and removed there. Written by the agent only: a pod cannot put its sockets here.
#[map]
pub static AGENT_SOCKETS: LruHashMap<u64, u8> =
    LruHashMap::with_max_entries(AGENT_SOCKETS_CAPACITY, 0);
shared_name!(AGENT_SOCKETS, map_name::AGENT_SOCKETS);

/// Original destination keyed by socket cookie, written by `connect4` (or `connect6` for an
/// IPv4-mapped destination) before the local port is
/// known and moved to `ORIGINAL_DST` once the connection is established.
#[map]
pub static PENDING: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(PENDING_CAPACITY, 0);
shared_name!(PENDING, map_name::PENDING);

/// Original destination keyed by (netns cookie, client port): what the agent reads after
/// `accept`. Removed when the client socket closes.
#[map]
pub static ORIGINAL_DST: LruHashMap<ConnKey, OriginalDst> =
    LruHashMap::with_max_entries(ORIGINAL_DST_CAPACITY, 0);
shared_name!(ORIGINAL_DST, map_name::ORIGINAL_DST);

/// Both ends of redirected connections, for the fast path (`fast_path.rs`). The kernel removes
/// a socket when it closes.
#[map]
pub static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(SOCKETS_CAPACITY, 0);
shared_name!(SOCKETS, map_name::SOCKETS);

/// How often each `Decision` was taken, per CPU.
#[map]
pub static DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Decision::COUNT, 0);
shared_name!(DECISIONS, map_name::DECISIONS);

pub fn count(decision: Decision) {
    if let Some(counter) = DECISIONS.get_ptr_mut(decision as u32) {
        // SAFETY: per-CPU slot, and eBPF programs are not preempted on their CPU while they run.
        unsafe { *counter += 1 };
    }
}

/// What plaintext to each captured pod address and port meets (`PlaintextInbound` as `u32`);
/// port 0 holds the pod's default. Filled by the agent.
#[map]
pub static INBOUND_POLICY: HashMap<InboundKey, u32> =
    HashMap::with_max_entries(INBOUND_POLICY_CAPACITY, 0);
shared_name!(INBOUND_POLICY, map_name::INBOUND_POLICY);

/// The agent's inbound listener in each captured pod, by pod address. The kernel removes a
/// listener when it closes (the agent died): the pod's plaintext then meets its fail mode.
#[map]
pub static INBOUND_LISTENERS: SockHash<u32> =
    SockHash::with_max_entries(INBOUND_LISTENERS_CAPACITY, 0);
shared_name!(INBOUND_LISTENERS, map_name::INBOUND_LISTENERS);

/// The node's own addresses: what the kubelet probes pods from.
#[map]
pub static NODE_ADDRESSES: HashMap<u32, u32> =
    HashMap::with_max_entries(NODE_ADDRESSES_CAPACITY, 0);
shared_name!(NODE_ADDRESSES, map_name::NODE_ADDRESSES);

/// How often each `InboundDecision` was taken, per CPU.
#[map]
pub static INBOUND_DECISIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(InboundDecision::COUNT, 0);
shared_name!(INBOUND_DECISIONS, map_name::INBOUND_DECISIONS);

pub fn count_inbound(decision: InboundDecision) {
    if let Some(counter) = INBOUND_DECISIONS.get_ptr_mut(decision as u32) {
        // SAFETY: per-CPU slot, and eBPF programs are not preempted on their CPU while they run.
        unsafe { *counter += 1 };
    }
}
