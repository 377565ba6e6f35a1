//! `sk_lookup`, attached to each captured pod's network namespace: a TCP connection arriving at
//! one of the pod's addresses is handed to the agent's inbound listener in the pod (which
//! judges it and delivers it to the app from inside the pod), refused (plaintext to a STRICT
//! port), or let through to the app's own socket.
//!
//! The link running this program is pinned on bpffs, so it outlives the agent: while the agent
//! is down its listener is gone from `INBOUND_LISTENERS` (the kernel removes a closed socket),
//! and each port meets its fail mode — STRICT stays refused, the rest goes straight to the app.
//! No address is rewritten: the accepted socket's local address is where the client was going.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{program_name, InboundDecision, InboundKey, PlaintextInbound, TUNNEL_PORT};

use crate::maps::{count_inbound, INBOUND_LISTENERS, INBOUND_POLICY, NODE_ADDRESSES};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid `bpf_sk_lookup` to this hook for its whole run.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let pod = lookup.local_ip4;
    // SAFETY: the value is copied out at once.
    let Some(default) = (unsafe { INBOUND_POLICY.get(&InboundKey { ip4: pod, port: 0 }) }).copied()
    else {
        // Not a captured address (loopback, say).
        return SK_PASS;
    };
    let remote = lookup.remote_ip4;
    // SAFETY: only presence is read.
    let from_node = unsafe { NODE_ADDRESSES.get(&remote) }.is_some();
    if lookup.local_port == u32::from(TUNNEL_PORT) || remote == pod || from_node {
        count_inbound(InboundDecision::Exempt);
        return SK_PASS;
    }
    let key = InboundKey {
        ip4: pod,
        port: lookup.local_port,
    };
    // SAFETY: the value is copied out at once.
    let mode = (unsafe { INBOUND_POLICY.get(&key) }).copied().unwrap_or(default);
    if mode == PlaintextInbound::Refuse as u32 {
        count_inbound(InboundDecision::Refused);
        return SK_DROP;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, pod, 0) {
        Ok(()) => count_inbound(InboundDecision::Captured),
        Err(_) => count_inbound(InboundDecision::AgentAbsent),
    }
    SK_PASS
}
shared_name!(mesh_sk_lookup, program_name::SK_LOOKUP);
