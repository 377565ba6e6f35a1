//! The cgroup links that run the programs, held as plain descriptors. aya attaches through links
//! too but keeps their descriptors to itself; a successor needs them, to switch each hook to its
//! own program in one step (`BPF_LINK_UPDATE`) rather than attach beside ours (both programs
//! would run) or after we detach (a moment with none).
//!
//! A link lives as long as any descriptor of it is open, in whichever process: an agent that
//! exits (or is killed) detaches its programs unless it handed its links over.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

/// The hooks the agent attaches to, by the kernel's attach type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    SockOps,
}

impl Hook {
    fn attach_type(self) -> u32 {
        (match self {
            Hook::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Hook::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
            Hook::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        }) as u32
    }
}

/// `bpf_attr` for `BPF_LINK_CREATE`, up to the fields used (the kernel zero-fills the rest).
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Attaches `program` to `cgroup` at `hook` with a new link; dropping the link's last
/// descriptor detaches it. Links on a cgroup always allow other programs beside them.
pub fn create(program: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, hook: Hook) -> io::Result<OwnedFd> {
    let attr = LinkCreate {
        prog_fd: fd_number(program),
        target_fd: fd_number(cgroup),
        attach_type: hook.attach_type(),
        flags: 0,
    };
    let fd = bpf(bpf_cmd::BPF_LINK_CREATE, &attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `link` run `program` from now on, in place of the program it ran: for each
/// connection one or the other runs, never both, never neither.
pub fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdate {
        link_fd: fd_number(link),
        new_prog_fd: fd_number(program),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &attr).map(drop)
}

fn fd_number(fd: BorrowedFd<'_>) -> u32 {
    // Open descriptors are never negative.
    fd.as_fd().as_raw_fd() as u32
}

fn bpf<A>(command: bpf_cmd, attr: &A) -> io::Result<i32> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `command`, valid for
    // reads of the size passed; the kernel only reads it for these two commands.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            std::ptr::from_ref(attr),
            size_of::<A>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(io::Error::other)
}
