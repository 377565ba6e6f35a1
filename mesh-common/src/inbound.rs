//! Inbound capture: what the `sk_lookup` program on a captured pod's network namespace does
//! with a TCP connection arriving at one of the pod's addresses.

use core::mem::size_of;

/// HBONE's port, where the agent's tunnel listener in each pod takes connections from other
/// agents: never captured (those connections are the mesh's own, mutual TLS included).
pub const TUNNEL_PORT: u16 = 15008;

/// Capacity of the inbound policy map: one default entry per captured pod address plus its
/// per-port overrides (`portLevelMtls`).
pub const INBOUND_POLICY_CAPACITY: u32 = 16_384;

/// Capacity of the map of the agent's inbound listeners: one per captured pod address.
pub const INBOUND_LISTENERS_CAPACITY: u32 = 4_096;

/// Capacity of the map of the node's own addresses.
pub const NODE_ADDRESSES_CAPACITY: u32 = 64;

/// A captured pod address (network order) and a port (host order); port 0 holds the pod's
/// default, another port an override for that port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub ip4: u32,
    pub port: u32,
}
const _: () = assert!(size_of::<InboundKey>() == 8);

/// What a plaintext connection to a captured pod port meets: the value of the policy map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaintextInbound {
    /// Handed to the agent's inbound listener in the pod (PERMISSIVE, DISABLE); delivered
    /// straight to the app while there is none (the agent is down): fail-open.
    Capture = 0,
    /// Refused (STRICT), whether the agent is up or not: fail-closed.
    Refuse = 1,
}

/// Why the `sk_lookup` program let a connection to a captured pod address through, handed it
/// to the agent or refused it; the index into the per-CPU inbound decision counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundDecision {
    /// Handed to the agent's inbound listener in the pod.
    Captured = 0,
    /// Plaintext to a STRICT port: refused.
    Refused = 1,
    /// No inbound listener in the pod (the agent is down or restarting): delivered directly.
    AgentAbsent = 2,
    /// From the node's own addresses (the kubelet's probes), from the pod itself (the agent
    /// delivering what it admitted) or to the tunnel port: not captured.
    Exempt = 3,
}

impl InboundDecision {
    pub const COUNT: u32 = 4;
    pub const ALL: [InboundDecision; Self::COUNT as usize] = [
        InboundDecision::Captured,
        InboundDecision::Refused,
        InboundDecision::AgentAbsent,
        InboundDecision::Exempt,
    ];

    /// Stable snake_case name, used in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            InboundDecision::Captured => "inbound_captured",
            InboundDecision::Refused => "inbound_refused",
            InboundDecision::AgentAbsent => "inbound_agent_absent",
            InboundDecision::Exempt => "inbound_exempt",
        }
    }
}
