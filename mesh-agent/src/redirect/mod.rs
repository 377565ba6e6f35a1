//! How enrolled pods' connections reach the agent, as the rest of the agent sees it. One facade,
//! [`Redirect`], over the backends: eBPF cgroup programs (`ebpf`, the default).

pub mod ebpf;
pub mod netns;
pub mod preflight;

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use mesh_common::Decision;
use thiserror::Error;

use self::ebpf::EbpfRedirect;

#[derive(Debug, Error)]
pub enum RedirectError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("this kernel cannot load or attach the {hook} hook ({program}): {source}")]
    Hook {
        hook: &'static str,
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("kernel map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// The redirect in force. Dropping it undoes it.
pub enum Redirect {
    Ebpf(EbpfRedirect),
}

impl Redirect {
    /// Checks the host, loads the eBPF programs and attaches them to `cgroup` (default: the root
    /// of the cgroup v2 mount). `agent_mark` is the socket mark of the agent's own sockets.
    pub fn attach(cgroup: Option<&Path>, agent_mark: u32) -> Result<Redirect, RedirectError> {
        EbpfRedirect::attach(cgroup, agent_mark).map(Redirect::Ebpf)
    }

    pub fn cgroup(&self) -> &Path {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.cgroup(),
        }
    }

    /// Starts redirecting new connections from the namespace with `netns_cookie` to
    /// `listener`. The listener must exist first: without it the programs fail open.
    pub fn enroll(&self, netns_cookie: u64, listener: SocketAddrV4) -> Result<(), RedirectError> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.enroll(netns_cookie, listener),
        }
    }

    /// Stops redirecting new connections from that namespace. Idempotent.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), RedirectError> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.unenroll(netns_cookie),
        }
    }

    /// Where the connection from `client_port` in the namespace `netns_cookie` was going.
    pub fn original_dst(&self, netns_cookie: u64, client_port: u16) -> Option<SocketAddrV4> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.original_dst(netns_cookie, client_port),
        }
    }

    /// Each decision's count, summed over CPUs, in `Decision::ALL` order.
    pub fn decision_counts(&self) -> [(Decision, u64); Decision::COUNT as usize] {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.decision_counts(),
        }
    }

    /// Entries now held by the original-destination maps (pending, established).
    pub fn map_occupancy(&self) -> (usize, usize) {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.map_occupancy(),
        }
    }
}
