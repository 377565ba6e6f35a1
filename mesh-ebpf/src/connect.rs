//! `cgroup/connect4` and `cgroup/connect6`: the redirect decision.
//!
//! Both hooks take the same decision for an IPv4 destination, whether it comes as such
//! (`connect4`) or IPv4-mapped (`::ffff:a.b.c.d`) through a dual-stack `AF_INET6` socket
//! (`connect6`: the kernel runs only that hook for such a socket, and carries the connection
//! over IPv4 to the agent's IPv4 listener). Native IPv6 is let through and counted.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use mesh_common::{addr, program_name, Decision, Enrollment, OriginalDst};

use crate::maps::{count, AGENT_SOCKETS, ENROLLED, PENDING};

/// Return value that lets `connect` proceed. The hooks never refuse a connection.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    count(connect4(&ctx));
    ALLOW
}
shared_name!(mesh_connect4, program_name::CONNECT4);

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    count(connect6(&ctx));
    ALLOW
}
shared_name!(mesh_connect6, program_name::CONNECT6);

fn connect4(ctx: &SockAddrContext) -> Decision {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to this hook for its whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    if let Some(passed) = passes_first(ctx, addr) {
        return passed;
    }
    match redirect_ip4(ctx, addr.user_ip4, addr.user_port) {
        Ok(listener) => {
            addr.user_ip4 = listener.listen_ip4;
            addr.user_port = u32::from(listener.listen_port);
            Decision::Redirected
        }
        Err(passed) => passed,
    }
}

fn connect6(ctx: &SockAddrContext) -> Decision {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to this hook for its whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    if let Some(passed) = passes_first(ctx, addr) {
        return passed;
    }
    let ip6 = addr.user_ip6;
    let Some(ip4) = addr::mapped_ip4(ip6) else {
        if ip6 == addr::LOOPBACK6 {
            return Decision::Loopback;
        }
        return match enrollment(ctx) {
            Some(_) => Decision::Ipv6Bypass,
            None => Decision::NotEnrolled,
        };
    };
    match redirect_ip4(ctx, ip4, addr.user_port) {
        Ok(listener) => {
            // Still a mapped address: the socket stays AF_INET6 and the kernel connects it
            // over IPv4, so the agent accepts it on its IPv4 listener like any other.
            addr.user_ip6 = addr::mapped(listener.listen_ip4);
            addr.user_port = u32::from(listener.listen_port);
            Decision::Redirected
        }
        Err(passed) => passed,
    }
}

/// What lets a connection pass before its destination matters: not TCP, or the agent's own
/// socket. The agent's entry is consumed: each of its sockets connects once.
fn passes_first(ctx: &SockAddrContext, addr: &bpf_sock_addr) -> Option<Decision> {
    if addr.type_ != SOCK_STREAM {
        return Some(Decision::NotTcp);
    }
    // SAFETY: helper allowed in sock_addr programs; `ctx` is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: only whether the entry exists is read.
    if unsafe { AGENT_SOCKETS.get(&cookie) }.is_some() {
        let _ = AGENT_SOCKETS.remove(&cookie);
        return Some(Decision::AgentSocket);
    }
    None
}

/// The caller's pod, if its network namespace is enrolled.
fn enrollment(ctx: &SockAddrContext) -> Option<Enrollment> {
    // SAFETY: helper allowed in sock_addr programs; `ctx` is the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; the agent only inserts or removes whole entries.
    (unsafe { ENROLLED.get(&netns) }).copied()
}

/// The decision for a TCP connection to the IPv4 address `ip4` and `port` (both network order,
/// as the hooks hand them over): the agent's listener to rewrite it to, with the original
/// destination remembered under the socket's cookie, or why it goes where it was going.
fn redirect_ip4(ctx: &SockAddrContext, ip4: u32, port: u32) -> Result<Enrollment, Decision> {
    if addr::is_loopback4(ip4) {
        return Err(Decision::Loopback);
    }
    let enrollment = enrollment(ctx).ok_or(Decision::NotEnrolled)?;
    if !listener_exists(ctx, enrollment.listen_ip4, enrollment.listen_port) {
        return Err(Decision::AgentAbsent);
    }
    let original = OriginalDst {
        ip4,
        port: port as u16,
        _pad: 0,
    };
    // SAFETY: helper allowed in sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    PENDING
        .insert(&cookie, &original, 0)
        .map_err(|_| Decision::MapError)?;
    Ok(enrollment)
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
