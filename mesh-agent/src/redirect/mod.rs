//! How enrolled pods' connections reach the agent, as the rest of the agent sees it. One facade,
//! [`Redirect`], over two backends: eBPF cgroup programs (`ebpf`, the default) and iptables
//! `REDIRECT` rules in each pod's namespace (`iptables`, the fallback for kernels without cgroup
//! BPF hooks).

pub mod addresses;
pub mod capture;
pub mod ebpf;
#[cfg(test)]
mod ebpf_object;
mod error;
pub mod iptables;
mod link;
pub mod netns;
pub mod preflight;
mod reuse;

use std::{io, net::SocketAddrV4, os::fd::AsFd, path::Path, sync::Arc};

use mesh_common::Decision;
use prometheus_client::registry::Registry;

use self::{
    capture::Capture,
    ebpf::{AgentSockets, EbpfRedirect},
    iptables::IptablesRedirect,
    netns::NetNs,
};
pub use self::{error::RedirectError, reuse::Inherited};
use crate::exposition::ScrapedCounters;

/// How enrolled pods' connections are handed to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectMode {
    /// cgroup `connect4`/`sockops` programs: fail-open, no conntrack, decision counters.
    Ebpf,
    /// iptables `REDIRECT` in each pod's namespace, original destination from conntrack: the
    /// fallback for kernels without cgroup BPF hooks. Fails closed if the agent dies.
    Iptables,
}

impl RedirectMode {
    pub fn name(self) -> &'static str {
        match self {
            RedirectMode::Ebpf => "ebpf",
            RedirectMode::Iptables => "iptables",
        }
    }
}

/// How the agent's own upstream sockets, dialled from inside enrolled pods' namespaces, are told
/// apart from the pods' sockets so the redirect lets them pass instead of sending them back to
/// the agent. The network namespace is no proof (the agent dials from the pod's own), so it
/// must be something a pod cannot set on its own sockets.
#[derive(Clone, Debug, Default)]
pub enum Exemption {
    /// Nothing to do: no redirect sees these sockets (the in-process tests, a proxy without a
    /// redirect).
    #[default]
    None,
    /// eBPF mode: the socket's cookie goes into the kernel's `AGENT_SOCKETS` map, which only a
    /// process with `CAP_BPF`/`CAP_SYS_ADMIN` in the initial user namespace can write (a pod
    /// cannot); `connect4`/`connect6` let that socket pass once and remove the entry.
    Cookie(Arc<AgentSockets>),
    /// iptables mode: `SO_MARK`, the only thing the rules can match. Forgeable: any process with
    /// `CAP_NET_ADMIN` in the pod's namespace can mark its sockets and skip the mesh.
    Mark(u32),
}

impl Exemption {
    /// Marks `socket` (created, not connected yet) as the agent's own.
    pub fn apply(&self, socket: &socket2::Socket) -> io::Result<()> {
        match self {
            Exemption::None => Ok(()),
            Exemption::Cookie(agent_sockets) => agent_sockets.exempt(socket),
            Exemption::Mark(mark) => socket.set_mark(*mark),
        }
    }
}

/// The redirect in force. Dropping it undoes it: eBPF programs detach, iptables rules are removed
/// from every pod still enrolled.
pub enum Redirect {
    /// Boxed: the loaded object and its maps are large, and there is one per agent.
    Ebpf(Box<EbpfRedirect>),
    Iptables(IptablesRedirect),
}

impl Redirect {
    /// Checks the host and sets up the redirect. eBPF: loads the programs and attaches them to
    /// `cgroup` (default: the root of the cgroup v2 mount). iptables: only checks for root and
    /// the tools (`cgroup` is not used); rules go into each pod as it is enrolled.
    /// `agent_mark` is the socket mark of the agent's own sockets in iptables mode (see
    /// [`Exemption::Mark`]); eBPF mode exempts them by cookie instead.
    ///
    /// `inherited`: a running agent's maps and links (see `crate::handover`). The programs
    /// then share its maps, and go in force only with [`Redirect::activate`].
    ///
    /// `capture_pins`: capture what arrives at pods too ([`Redirect::capture`]; eBPF mode only),
    /// pinning its links in this directory on bpffs.
    pub fn start(
        mode: RedirectMode,
        cgroup: Option<&Path>,
        agent_mark: u32,
        socket_fast_path: bool,
        inherited: Inherited,
        capture_pins: Option<&Path>,
    ) -> Result<Redirect, RedirectError> {
        match mode {
            RedirectMode::Ebpf => {
                EbpfRedirect::attach(cgroup, socket_fast_path, inherited, capture_pins)
                    .map(|ebpf| Redirect::Ebpf(Box::new(ebpf)))
            }
            RedirectMode::Iptables if !inherited.is_empty() => Err(RedirectError::Handover(
                "the running agent handed over eBPF state to an agent in iptables mode".to_owned(),
            )),
            RedirectMode::Iptables => IptablesRedirect::new(agent_mark).map(Redirect::Iptables),
        }
    }

    /// Puts this agent's programs in force on the links a predecessor handed over (eBPF mode;
    /// nothing to do otherwise, or when the programs were attached at start).
    pub fn activate(&self) -> Result<(), RedirectError> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.activate(),
            Redirect::Iptables(_) => Ok(()),
        }
    }

    /// What a successor needs of the kernel state: the maps and the links (eBPF mode).
    pub fn kernel_state(&self) -> io::Result<Inherited> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.kernel_state(),
            Redirect::Iptables(_) => Ok(Inherited::default()),
        }
    }

    /// The redirect is a successor's from now on: leaving undoes nothing (iptables rules stay;
    /// eBPF links live on in the successor's descriptors).
    pub fn relinquish(&self) {
        if let Redirect::Iptables(iptables) = self {
            iptables.relinquish();
        }
    }

    pub fn mode(&self) -> RedirectMode {
        match self {
            Redirect::Ebpf(_) => RedirectMode::Ebpf,
            Redirect::Iptables(_) => RedirectMode::Iptables,
        }
    }

    /// What the agent's upstream sockets need so that this redirect lets them pass.
    pub fn exemption(&self) -> Exemption {
        match self {
            Redirect::Ebpf(ebpf) => Exemption::Cookie(ebpf.agent_sockets()),
            Redirect::Iptables(iptables) => Exemption::Mark(iptables.agent_mark()),
        }
    }

    /// Inbound capture (eBPF mode, when asked for at start).
    pub fn capture(&self) -> Option<&Capture> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.capture(),
            Redirect::Iptables(_) => None,
        }
    }

    /// The cgroup the programs are attached to (eBPF mode only).
    pub fn cgroup(&self) -> Option<&Path> {
        match self {
            Redirect::Ebpf(ebpf) => Some(ebpf.cgroup()),
            Redirect::Iptables(_) => None,
        }
    }

    /// Starts redirecting new connections from the namespace `netns` (whose cookie is
    /// `netns_cookie`) to `listener`. The listener must exist first: without it eBPF fails open,
    /// and iptables would send connections nowhere.
    pub fn enroll(
        &self,
        netns: &NetNs,
        netns_cookie: u64,
        listener: SocketAddrV4,
    ) -> Result<(), RedirectError> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.enroll(netns_cookie, listener),
            Redirect::Iptables(iptables) => iptables.enroll(netns, netns_cookie, listener),
        }
    }

    /// Stops redirecting new connections from that namespace. Idempotent.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), RedirectError> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.unenroll(netns_cookie),
            Redirect::Iptables(iptables) => iptables.unenroll(netns_cookie),
        }
    }

    /// Where the accepted connection `stream`, from `client_port` in the namespace
    /// `netns_cookie`, was going; `None` if it was not redirected.
    pub fn original_dst(
        &self,
        stream: impl AsFd,
        netns_cookie: u64,
        client_port: u16,
    ) -> Option<SocketAddrV4> {
        match self {
            Redirect::Ebpf(ebpf) => ebpf.original_dst(netns_cookie, client_port),
            Redirect::Iptables(_) => IptablesRedirect::original_dst(stream),
        }
    }

    /// Serves `decisions_total{decision}` (under the caller's prefix: `mesh_redirect_`) from the
    /// kernel's per-CPU counters, read at each scrape. Only eBPF mode counts decisions; the
    /// metric holds the redirect weakly, so it never keeps the programs attached.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        if self.mode() != RedirectMode::Ebpf {
            return;
        }
        let redirect = Arc::downgrade(self);
        registry.register_collector(Box::new(ScrapedCounters {
            name: "decisions",
            help: "Connections seen by the kernel redirect, by decision",
            label: "decision",
            read: move || {
                let Some(redirect) = redirect.upgrade() else {
                    return Vec::new();
                };
                let outbound = redirect.decision_counts().into_iter().flatten();
                let inbound = redirect.capture().map(Capture::decision_counts);
                outbound
                    .map(|(d, n)| (d.name(), n))
                    .chain(inbound.into_iter().flatten().map(|(d, n)| (d.name(), n)))
                    .collect()
            },
        }));
    }

    /// Each decision's count, summed over CPUs, in `Decision::ALL` order. `None` in iptables
    /// mode, which has no such counters.
    pub fn decision_counts(&self) -> Option<[(Decision, u64); Decision::COUNT as usize]> {
        match self {
            Redirect::Ebpf(ebpf) => Some(ebpf.decision_counts()),
            Redirect::Iptables(_) => None,
        }
    }

    /// Entries now held by the original-destination maps (pending, established); `None` in
    /// iptables mode, where conntrack holds them.
    pub fn map_occupancy(&self) -> Option<(usize, usize)> {
        match self {
            Redirect::Ebpf(ebpf) => Some(ebpf.map_occupancy()),
            Redirect::Iptables(_) => None,
        }
    }

    /// Sockets on the sk_msg fast path now, two per redirected connection (eBPF mode only).
    pub fn fast_path_sockets(&self) -> Option<usize> {
        match self {
            Redirect::Ebpf(ebpf) => Some(ebpf.fast_path_sockets()),
            Redirect::Iptables(_) => None,
        }
    }

    /// Namespaces with iptables rules installed now (iptables mode only).
    pub fn iptables_enrolled(&self) -> Option<usize> {
        match self {
            Redirect::Ebpf(_) => None,
            Redirect::Iptables(iptables) => Some(iptables.enrolled_count()),
        }
    }
}
