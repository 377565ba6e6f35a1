//! The socket fast path: both ends of a redirected connection live in the pod's namespace on
//! loopback (the app's socket and the agent's in-pod socket), so every byte would cross the TCP
//! stack twice for nothing. `sockops` puts both sockets in `SOCKETS` when the connection is
//! established; `sk_msg` then hands each message straight to the peer socket's receive queue.
//! Handshake and FIN still travel through TCP, so connection state stays the kernel's; a socket
//! missing from the map (map full, fast path off, peer gone) simply takes the loopback path.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext,
};
use mesh_common::{global_name, program_name, SockKey};

use crate::maps::{ENROLLED, SOCKETS};

/// 1: put redirected connections on the fast path; 0: leave them on loopback TCP. Set by the
/// loader (`--socket-fast-path`).
#[unsafe(no_mangle)]
static FAST_PATH: u32 = 0;
shared_name!(FAST_PATH, global_name::FAST_PATH);

/// The kernel keeps the remote port in network order in the upper 16 bits of the field (on
/// little-endian hosts), the local port in host order.
fn remote_port(field: u32) -> u32 {
    u32::from(u16::from_be((field >> 16) as u16))
}

fn enabled() -> bool {
    // SAFETY: a plain read of a loader-set constant; volatile so the compiler cannot fold it.
    (unsafe { read_volatile(&FAST_PATH) }) != 0
}

fn key(ctx: &SockOpsContext, netns_cookie: u64) -> SockKey {
    SockKey {
        netns_cookie,
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        remote_port: remote_port(ctx.remote_port()),
    }
}

/// The app's end: called for connections `connect4` redirected, once established.
pub fn add_app_socket(ctx: &SockOpsContext, netns_cookie: u64) {
    if enabled() {
        // SAFETY: `ops` is the program's valid context for the whole run.
        let ops = unsafe { &mut *ctx.ops };
        let _ = SOCKETS.update(key(ctx, netns_cookie), ops, BPF_NOEXIST as u64);
    }
}

/// The agent's end: a connection accepted by the agent's in-pod listener of an enrolled pod.
pub fn add_agent_socket(ctx: &SockOpsContext, netns_cookie: u64) {
    if !enabled() {
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(enrollment) = (unsafe { ENROLLED.get(&netns_cookie) }).copied() else {
        return;
    };
    let key = key(ctx, netns_cookie);
    if key.local_ip4 != enrollment.listen_ip4
        || key.local_port != u32::from(u16::from_be(enrollment.listen_port))
    {
        return;
    }
    // SAFETY: `ops` is the program's valid context for the whole run.
    let _ = SOCKETS.update(key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64);
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands a valid `sk_msg_md` to this hook for its whole run.
    let msg = unsafe { &*ctx.msg };
    let own = SockKey {
        // SAFETY: helper allowed in sk_msg programs; `ctx` is the program's context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_ip4: msg.local_ip4,
        remote_ip4: msg.remote_ip4,
        local_port: msg.local_port,
        remote_port: remote_port(msg.remote_port),
    };
    // On failure (no peer in the map) the message is not redirected: passing it sends it
    // through TCP as usual.
    let _ = SOCKETS.redirect_msg(&ctx, own.peer(), BPF_F_INGRESS as u64);
    SK_PASS
}
shared_name!(mesh_sk_msg, program_name::SK_MSG);
