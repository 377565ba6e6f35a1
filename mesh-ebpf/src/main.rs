//! Kernel side of the mesh: hands every enrolled pod's outbound TCP connection to the node
//! agent's in-pod listener and remembers where it was going (`connect.rs`, `sock_ops.rs`), and
//! every plaintext connection arriving at a captured pod to the agent's inbound listener in it
//! (`inbound.rs`).
//!
//! The outbound hooks let the connection proceed whatever happens; when they cannot redirect,
//! they count why (see `mesh_common::Decision`). Inbound refuses plaintext to a STRICT port
//! (see `mesh_common::InboundDecision`).
#![no_std]
#![no_main]

/// Fails the build unless `$item` (a map, program or loader-set global) has the name the agent
/// looks it up by in `mesh_common`. The loader finds each by its symbol, which aya's `#[map]`
/// and program macros and `#[no_mangle]` take from the Rust name; the reference to `$item`
/// makes a rename that forgets the constant fail here too.
macro_rules! shared_name {
    ($item:ident, $name:path) => {
        const _: () = {
            let _ = &$item;
            assert!(
                mesh_common::names_match(stringify!($item), $name),
                concat!(
                    "`",
                    stringify!($item),
                    "` must carry the name in `",
                    stringify!($name),
                    "`: the agent looks it up by that name"
                )
            );
        };
    };
}

mod connect;
mod fast_path;
mod inbound;
mod maps;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic at run time; the verifier rejects any path that would
    // reach this, so it is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
