//! The links that run the programs, held as plain descriptors: cgroup links for the outbound
//! hooks, a network namespace's for inbound capture (`sk_lookup`). aya attaches through links
//! too but keeps their descriptors to itself; a successor needs them, to switch each hook to its
//! own program in one step (`BPF_LINK_UPDATE`) rather than attach beside ours (both programs
//! would run) or after we detach (a moment with none).
//!
//! A link lives as long as any descriptor of it is open, in whichever process, or as long as it
//! is pinned on a BPF filesystem: an agent that exits (or is killed) detaches its cgroup
//! programs unless it handed their links over; the inbound capture links are pinned, to outlive
//! it (`capture.rs`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

/// The hooks the agent attaches to, by the kernel's attach type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    SockOps,
    /// On a network namespace.
    SkLookup,
}

impl Hook {
    fn attach_type(self) -> u32 {
        (match self {
            Hook::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Hook::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
            Hook::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
            Hook::SkLookup => bpf_attach_type::BPF_SK_LOOKUP,
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

/// `bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
struct Object {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Attaches `program` to `target` (a cgroup, or a network namespace for
/// [`Hook::SkLookup`]) at `hook` with a new link; dropping the link's last descriptor detaches
/// it unless it is pinned. Links always allow other programs beside them.
pub fn create(program: BorrowedFd<'_>, target: BorrowedFd<'_>, hook: Hook) -> io::Result<OwnedFd> {
    let attr = LinkCreate {
        prog_fd: fd_number(program),
        target_fd: fd_number(target),
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

/// Pins `link` at `path` on a BPF filesystem: it stays attached when its descriptors close,
/// until the pin is removed.
pub fn pin(link: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = Object {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd_number(link),
        file_flags: 0,
    };
    bpf(bpf_cmd::BPF_OBJ_PIN, &attr).map(drop)
}

/// The link pinned at `path`, if there is one.
pub fn open_pinned(path: &Path) -> io::Result<Option<OwnedFd>> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = Object {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    match bpf(bpf_cmd::BPF_OBJ_GET, &attr) {
        // SAFETY: BPF_OBJ_GET returned a new descriptor, owned by nobody else.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// The inode of the network namespace a netns link is attached to; 0 once that namespace is
/// gone (the link is defunct).
pub fn netns_inode(link: BorrowedFd<'_>) -> io::Result<u32> {
    // `struct bpf_link_info`: type, id, prog_id, then (8-byte aligned) the union whose netns
    // member starts with `netns_ino`.
    let mut info = [0u32; 16];
    let attr = InfoByFd {
        bpf_fd: fd_number(link),
        info_len: u32::try_from(size_of_val(&info)).map_err(io::Error::other)?,
        info: info.as_mut_ptr() as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info[4])
}

fn fd_number(fd: BorrowedFd<'_>) -> u32 {
    // Open descriptors are never negative.
    fd.as_fd().as_raw_fd() as u32
}

fn bpf<A>(command: bpf_cmd, attr: &A) -> io::Result<i32> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `command`, valid for
    // reads of the size passed; the kernel reads it, and writes only through the pointers it
    // holds (a path to read, an info buffer of the length given).
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
