//! `sockops`: once a redirected connection is established its local port is known, so the
//! original destination moves to the map the agent reads after `accept`, keyed by what the
//! agent sees (netns cookie, peer port). The entry goes away when the client socket closes.
//! Both ends of a redirected connection also join the fast path (`fast_path.rs`).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use mesh_common::{program_name, ConnKey};

use crate::{
    fast_path,
    maps::{ORIGINAL_DST, PENDING},
};

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        // SAFETY: helper allowed in sock_ops programs; `ctx` is the program's context.
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            fast_path::add_agent_socket(&ctx, unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
}
shared_name!(mesh_sock_ops, program_name::SOCK_OPS);

/// The same key for an `AF_INET6` socket that `connect6` redirected to an IPv4-mapped address:
/// the netns cookie and local port (`skc_num`, host order) do not depend on the family, and the
/// agent, accepting on its IPv4 listener, sees that port as an IPv4 peer's.
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    ConnKey {
        // SAFETY: helper allowed in sock_ops programs; `ctx` is the program's context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client_port: ctx.local_port(),
        _pad: 0,
    }
}

fn on_established(ctx: &SockOpsContext) {
    // SAFETY: helper allowed in sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(original) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return;
    };
    let _ = PENDING.remove(&cookie);
    let key = conn_key(ctx);
    if ORIGINAL_DST.insert(&key, &original, 0).is_ok() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
    fast_path::add_app_socket(ctx, key.netns_cookie);
}

fn on_close(ctx: &SockOpsContext) {
    let _ = ORIGINAL_DST.remove(&conn_key(ctx));
}
