//! `cgroup/connect4` and `cgroup/connect6`: the redirect decision.

use core::{mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use mesh_common::{global_name, program_name, Decision, OriginalDst, DEFAULT_AGENT_MARK};

use crate::maps::{count, ENROLLED, PENDING};

/// Mark on the agent's own sockets; set by the loader (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static AGENT_MARK: u32 = DEFAULT_AGENT_MARK;
shared_name!(AGENT_MARK, global_name::AGENT_MARK);

/// Return value that lets `connect` proceed. The hooks never refuse a connection.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    count(redirect4(&ctx));
    ALLOW
}
shared_name!(mesh_connect4, program_name::CONNECT4);

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // IPv6 services follow the IPv4 path once the agent listens on [::1]; until then every
    // IPv6 connection proceeds untouched and is counted.
    let _ = ctx;
    count(Decision::Ipv6);
    ALLOW
}
shared_name!(mesh_connect6, program_name::CONNECT6);

fn redirect4(ctx: &SockAddrContext) -> Decision {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to this hook for its whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return Decision::NotTcp;
    }
    // SAFETY: `sk` is always set for sock_addr hooks; the verifier checks the access.
    let mark = unsafe { (*addr.__bindgen_anon_1.sk).mark };
    // SAFETY: a plain read of a loader-set constant; volatile so the compiler cannot fold it.
    if mark == unsafe { read_volatile(&AGENT_MARK) } {
        return Decision::AgentSocket;
    }
    // The first octet of a network-order address is its lowest byte on this little-endian target.
    if addr.user_ip4 & 0xff == 127 {
        return Decision::Loopback;
    }
    // SAFETY: helper allowed in sock_addr programs; `ctx` is the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; the agent only inserts or removes whole entries.
    let Some(enrollment) = (unsafe { ENROLLED.get(&netns) }).copied() else {
        return Decision::NotEnrolled;
    };
    if !listener_exists(ctx, enrollment.listen_ip4, enrollment.listen_port) {
        return Decision::AgentAbsent;
    }
    let original = OriginalDst {
        ip4: addr.user_ip4,
        port: addr.user_port as u16,
        _pad: 0,
    };
    // SAFETY: helper allowed in sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(&cookie, &original, 0).is_err() {
        return Decision::MapError;
    }
    addr.user_ip4 = enrollment.listen_ip4;
    addr.user_port = u32::from(enrollment.listen_port);
    Decision::Redirected
}

/// Whether the agent listens in the caller's network namespace; if it does not, the connection
/// goes where it was going (fail-open).
fn listener_exists(ctx: &SockAddrContext, ip4: u32, port: u16) -> bool {
    // SAFETY: a zeroed tuple is valid; only the IPv4 member is used.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.daddr = ip4;
    tuple.__bindgen_anon_1.ipv4.dport = port;
    // SAFETY: the tuple lives on the stack for the call; its size is that of the IPv4 member.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size_of::<u32>() as u32 * 2 + size_of::<u16>() as u32 * 2,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` came from `bpf_sk_lookup_tcp` and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
