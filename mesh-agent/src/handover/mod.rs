//! Zero-downtime restart: a new agent takes over from the running one without a refused
//! connection, a failed request or a connection that bypasses the mesh.
//!
//! Everything the agent serves with is a file descriptor, and descriptors can be handed to
//! another process (`SCM_RIGHTS` over a Unix socket). The running agent listens on its
//! *handover socket* (`--handover-socket`, mode 0600 like the admin socket); an agent starting
//! connects there first. If nobody answers it starts afresh; if the running agent answers:
//!
//! 1. **hello** (new → running): who asks and with what redirect mode, cgroup, in-pod listener
//!    address and network namespace. The running agent refuses a successor that would run
//!    differently (those must stop the old agent first), and one while another is taking over.
//! 2. **inventory** (running → new): every descriptor it holds, each under a name — the listener
//!    in each enrolled pod with the pod's network namespace, the ingress and admin listeners,
//!    the admin and handover socket files, the kernel maps and the cgroup links of its programs
//!    ([`Handed`]). The running agent keeps serving with its own copies of the same sockets, and
//!    changes no enrollment from here on. The new agent loads its own programs against the
//!    maps it received, so a connection redirected by either agent's programs is found by
//!    either, and `AGENT_SOCKETS` exempts both agents' upstream sockets.
//! 3. The new agent starts with the same listeners (one socket each, shared by both
//!    processes: a connection waiting in a queue is there for either), the same enrolled pods
//!    and its own config, but accepts nothing yet. Once it is ready it switches each cgroup
//!    link to its own programs (`BPF_LINK_UPDATE`: atomic, the hook is never empty nor
//!    doubled), starts accepting, and says **take over**.
//! 4. **released** (running → new): the running agent has stopped accepting and closed its
//!    copies of the listeners; it drains what it was serving (requests in flight finish, HTTP/2
//!    gets GOAWAY, HTTP/1 closes between requests) and waits for SIGTERM, without unenrolling
//!    or detaching anything: the kernel state is the new agent's now.
//!
//! Names are this module's only vocabulary ([`names`]): a listener added later (a tunnel, an
//! inbound listener) is one more named entry, not a protocol change. An entry the new agent
//! does not know is closed, with a warning.
//!
//! If the new agent fails or goes away before it takes over, the running agent carries on as
//! if nothing had happened. If the running agent dies after handing its inventory over, the new
//! one holds every descriptor already and takes over alone.

pub mod serve;
pub mod take;
mod wire;

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, SocketAddrV4},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::socket_file::SocketFile;

/// Where `mesh-agent run` listens for a successor, and connects first to find a predecessor,
/// unless told otherwise (`--handover-socket`).
pub const DEFAULT_PATH: &str = "/run/mesh-agent/handover.sock";

/// Bumped on any change a running agent of an older version would misread.
pub const PROTOCOL: u32 = 1;

/// The names of what is handed over: `<kind>/<which>`.
pub mod names {
    /// `pod/<namespace>/<name>`: the listener inside an enrolled pod, then the pod's network
    /// namespace; info: [`crate::enrollment::EnrolledPod`].
    pub const POD: &str = "pod/";
    /// `tunnel/<namespace>/<name>`: the pod's HBONE listener (port 15008 inside the pod), when
    /// the agent runs the tunnel; no info. A predecessor without one hands none.
    pub const POD_TUNNEL: &str = "tunnel/";
    /// `inbound/<namespace>/<name>`: the pod's inbound listener (what the kernel's capture
    /// hands over), when the agent captures; no info. A predecessor without one hands none.
    pub const POD_INBOUND: &str = "inbound/";
    /// The ingress gateway's listener.
    pub const INGRESS: &str = "listener/ingress";
    /// The admin API's TCP listener.
    pub const ADMIN: &str = "listener/admin";
    /// The admin API's Unix socket; info: [`super::SocketInfo`].
    pub const ADMIN_SOCKET: &str = "socket/admin";
    /// The handover socket itself, for the next successor; info: [`super::SocketInfo`].
    pub const HANDOVER_SOCKET: &str = "socket/handover";
    /// `kernel/map/<NAME>`: a map the kernel programs share with the agent.
    pub const MAP: &str = "kernel/map/";
    /// `kernel/link/<program>`: the cgroup link that runs that program.
    pub const LINK: &str = "kernel/link/";
}

/// One thing handed over: its name, what the receiver needs to know about it, its descriptors.
#[derive(Debug)]
pub struct Handed {
    pub name: String,
    pub info: Value,
    pub fds: Vec<OwnedFd>,
}

impl Handed {
    pub fn new(name: impl Into<String>, info: Value, fds: Vec<OwnedFd>) -> Handed {
        Handed {
            name: name.into(),
            info,
            fds,
        }
    }

    /// A socket file with its listener (see [`Inventory::take_socket_file`]).
    pub fn socket_file(name: &str, file: &SocketFile, listener: OwnedFd) -> Handed {
        let info = SocketInfo {
            path: file.path.clone(),
            identity: file.identity(),
        };
        Handed::new(
            name,
            serde_json::to_value(info).unwrap_or_default(),
            vec![listener],
        )
    }
}

/// What a socket file entry says about the file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SocketInfo {
    pub path: PathBuf,
    /// (device, inode) of the file, as the running agent bound it.
    pub identity: (u64, u64),
}

/// What a part of the agent hands over, asked at the moment a successor says hello.
pub trait Source: Send + Sync {
    /// The entries to hand over now. From this call on, until [`Source::thaw`], what they
    /// describe must not change (a pod neither enrolled nor unenrolled): the successor
    /// starts from exactly this.
    fn handed(&self) -> io::Result<Vec<Handed>>;

    /// The successor went away without taking over: changes are allowed again.
    fn thaw(&self) {}
}

/// Fixed listeners handed over as they are (the ingress and admin listeners, socket files).
#[derive(Default)]
pub struct Listeners {
    entries: std::sync::Mutex<Vec<(String, Value, OwnedFd)>>,
}

impl Listeners {
    /// Hands over a copy of `fd` under `name` from now on.
    pub fn add(&self, name: &str, info: Value, fd: OwnedFd) {
        self.entries
            .lock()
            .expect("handover listeners lock")
            .push((name.to_owned(), info, fd));
    }

    /// Hands over a copy of `listener`, the socket file `file`'s, under `name` (taken back
    /// apart by [`Inventory::take_socket_file`]).
    pub fn add_socket_file(&self, name: &str, file: &SocketFile, listener: OwnedFd) {
        let info = SocketInfo {
            path: file.path.clone(),
            identity: file.identity(),
        };
        self.add(
            name,
            serde_json::to_value(info).unwrap_or_default(),
            listener,
        );
    }
}

impl Source for Listeners {
    fn handed(&self) -> io::Result<Vec<Handed>> {
        let entries = self.entries.lock().expect("handover listeners lock");
        entries
            .iter()
            .map(|(name, info, fd)| {
                Ok(Handed::new(
                    name.clone(),
                    info.clone(),
                    vec![fd.try_clone()?],
                ))
            })
            .collect()
    }
}

/// Everything received from the predecessor, taken apart by name as the agent starts.
#[derive(Debug, Default)]
pub struct Inventory {
    entries: BTreeMap<String, Handed>,
}

impl Inventory {
    pub fn new(entries: Vec<Handed>) -> Inventory {
        Inventory {
            entries: entries.into_iter().map(|h| (h.name.clone(), h)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn take(&mut self, name: &str) -> Option<Handed> {
        self.entries.remove(name)
    }

    /// Every entry whose name starts with `prefix`, by the rest of its name.
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, Handed)> {
        let names: Vec<String> = self
            .entries
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect();
        names
            .into_iter()
            .filter_map(|name| {
                let handed = self.entries.remove(&name)?;
                Some((name[prefix.len()..].to_owned(), handed))
            })
            .collect()
    }

    /// The TCP listener `name` if it listens on `addr` (the address this agent was asked to
    /// listen on); `None` if there is none, or it listens elsewhere (then closed: this agent
    /// binds its own).
    pub fn take_tcp_listener(
        &mut self,
        name: &str,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let fd = self.take(name)?.fds.into_iter().next()?;
        let listener = std::net::TcpListener::from(fd);
        match listener.local_addr() {
            Ok(local) if local == addr || addr.port() == 0 && local.ip() == addr.ip() => {
                Some(listener)
            }
            _ => {
                tracing::info!(name, %addr, "the predecessor's listener is elsewhere: binding anew");
                None
            }
        }
    }

    /// The socket file `name` with its listener, if `path` (where this agent was asked to
    /// listen) is still the very file the predecessor bound; `None` otherwise (this agent then
    /// binds its own).
    pub fn take_socket_file(&mut self, name: &str, path: &Path) -> Option<(SocketFile, OwnedFd)> {
        let handed = self.take(name)?;
        let info: SocketInfo = serde_json::from_value(handed.info).ok()?;
        let fd = handed.fds.into_iter().next()?;
        Some((SocketFile::adopt(path, info.identity)?, fd))
    }

    /// Closes whatever no part of this agent took, saying what.
    pub fn close_rest(self) {
        for name in self.entries.keys() {
            tracing::warn!(
                name,
                "the predecessor handed over something this agent does not use: closing it"
            );
        }
    }
}

/// Who an agent is and how it runs: a successor must run the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    /// `ebpf` or `iptables`.
    pub redirect: String,
    /// The cgroup the programs are attached to (eBPF mode).
    pub cgroup: Option<PathBuf>,
    /// Where the agent listens inside each enrolled pod.
    pub listen: SocketAddrV4,
    /// The agent's own network namespace (where its ingress and admin listeners are).
    pub netns_cookie: u64,
}

impl AgentInfo {
    /// Why `successor` cannot take over from `self`, if it cannot.
    pub fn mismatch(&self, successor: &AgentInfo) -> Option<String> {
        if self.redirect != successor.redirect {
            return Some(format!(
                "it redirects with {}, the new agent with {}",
                self.redirect, successor.redirect
            ));
        }
        if self.cgroup != successor.cgroup {
            return Some(format!(
                "its programs are attached to cgroup {}, the new agent's would be at {}",
                shown(self.cgroup.as_deref()),
                shown(successor.cgroup.as_deref())
            ));
        }
        if self.listen != successor.listen {
            return Some(format!(
                "it listens at {} in each pod, the new agent at {}",
                self.listen, successor.listen
            ));
        }
        if self.netns_cookie != successor.netns_cookie {
            return Some("the new agent runs in another network namespace".to_owned());
        }
        None
    }
}

fn shown(path: Option<&Path>) -> String {
    path.map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
}

/// Why a running agent turned a successor away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Another agent is taking over right now.
    Busy,
    /// It is shutting down without a successor (SIGTERM came first).
    ShuttingDown,
    /// The successor would run differently (what, in words).
    Mismatch(String),
    /// Another protocol version.
    Protocol(u32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Busy => f.write_str("another agent is taking over from it right now"),
            Refusal::ShuttingDown => f.write_str("it is shutting down (SIGTERM came first)"),
            Refusal::Mismatch(why) => f.write_str(why),
            Refusal::Protocol(theirs) => write!(
                f,
                "it speaks handover protocol {theirs}, this agent {PROTOCOL}"
            ),
        }
    }
}

/// The messages, one per `SOCK_SEQPACKET` datagram, descriptors alongside.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
enum Message {
    /// New → running.
    Hello { protocol: u32, agent: AgentInfo },
    /// Running → new: `entries` entries follow, in batches.
    Inventory {
        protocol: u32,
        agent: AgentInfo,
        entries: usize,
    },
    /// Running → new: the next entries; their descriptors ride along, in order.
    Batch { entries: Vec<EntryHead> },
    /// Running → new, instead of the inventory, or instead of `Released`.
    Refused { refusal: Refusal },
    /// New → running: ready; stop accepting.
    TakeOver,
    /// New → running: giving up (why).
    Abort { reason: String },
    /// Running → new: no longer accepting; draining.
    Released,
}

/// An entry as it travels: its descriptors are the next `fds` of the message's.
#[derive(Debug, Serialize, Deserialize)]
struct EntryHead {
    name: String,
    info: Value,
    fds: usize,
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("the running agent (pid {pid}) refused to hand over: {refusal}")]
    Refused { pid: u32, refusal: Refusal },
    #[error("the running agent (pid {pid}) did not answer as expected: {what}")]
    Protocol { pid: u32, what: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentInfo {
        AgentInfo {
            pid: 1,
            version: "0.1.0".to_owned(),
            redirect: "ebpf".to_owned(),
            cgroup: Some(PathBuf::from("/sys/fs/cgroup")),
            listen: "127.0.0.1:15001".parse().unwrap(),
            netns_cookie: 1,
        }
    }

    #[test]
    fn only_a_successor_that_runs_the_same_way_may_take_over() {
        let running = agent();
        let newer = AgentInfo {
            pid: 2,
            version: "0.2.0".to_owned(),
            ..agent()
        };
        assert_eq!(running.mismatch(&newer), None, "pid and version may differ");
        let elsewhere = AgentInfo {
            cgroup: Some(PathBuf::from("/sys/fs/cgroup/kubepods")),
            ..agent()
        };
        assert_eq!(
            running.mismatch(&elsewhere).unwrap(),
            "its programs are attached to cgroup /sys/fs/cgroup, the new agent's would be at \
             /sys/fs/cgroup/kubepods"
        );
        let iptables = AgentInfo {
            redirect: "iptables".to_owned(),
            cgroup: None,
            ..agent()
        };
        assert!(running.mismatch(&iptables).unwrap().contains("iptables"));
        let port = AgentInfo {
            listen: "127.0.0.1:15006".parse().unwrap(),
            ..agent()
        };
        assert!(running.mismatch(&port).unwrap().contains("127.0.0.1:15006"));
        let netns = AgentInfo {
            netns_cookie: 7,
            ..agent()
        };
        assert!(running.mismatch(&netns).is_some());
    }

    #[test]
    fn entries_are_taken_apart_by_name() {
        let pipe = || OwnedFd::from(std::io::pipe().unwrap().0);
        let mut inventory = Inventory::new(vec![
            Handed::new("pod/default/a", Value::Null, vec![pipe()]),
            Handed::new("pod/shop/b", Value::Null, vec![pipe()]),
            Handed::new("kernel/map/ENROLLED", Value::Null, vec![pipe()]),
            Handed::new("listener/tunnel", Value::Null, vec![pipe()]),
        ]);
        let pods: Vec<String> = inventory
            .take_prefixed(names::POD)
            .into_iter()
            .map(|(rest, _)| rest)
            .collect();
        assert_eq!(pods, ["default/a", "shop/b"]);
        assert!(inventory.take(names::INGRESS).is_none());
        assert!(inventory.take("kernel/map/ENROLLED").is_some());
        assert!(!inventory.is_empty(), "what nobody took is left");
        inventory.close_rest();
    }
}
