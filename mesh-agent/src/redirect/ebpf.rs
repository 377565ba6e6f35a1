//! The eBPF backend: loads and attaches the cgroup programs, fills the enrollment map, reads
//! original destinations and decision counters from the kernel maps.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::{
    capture::{Capture, CaptureParts},
    error::RedirectError,
    link::{self, Hook},
    preflight,
    reuse::{self, Inherited},
};
use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    global_name, map_name, program_name, ConnKey, Decision, Enrollment, OriginalDst, SockKey,
};

/// The kernel object built by `cargo xtask build-ebpf`, embedded by `build.rs`; empty when the
/// agent was built without it.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Why `build.rs` embedded no object (missing, or older than the kernel sources); `None` when it
/// embedded one.
const NOT_EMBEDDED: Option<&str> = option_env!("MESH_EBPF_NOT_EMBEDDED");

/// Program names in the object, and the hook each one needs.
const PROGRAMS: [(&str, &str, Hook); 3] = [
    (program_name::CONNECT4, "cgroup/connect4", Hook::Connect4),
    (program_name::CONNECT6, "cgroup/connect6", Hook::Connect6),
    (program_name::SOCK_OPS, "sockops", Hook::SockOps),
];

/// The maps the programs share with the agent, handed to a successor so that its programs and
/// ours work on the same entries. (The object's global data stays each agent's own.)
const SHARED_MAPS: [&str; 10] = [
    map_name::ENROLLED,
    map_name::PENDING,
    map_name::ORIGINAL_DST,
    map_name::SOCKETS,
    map_name::DECISIONS,
    map_name::AGENT_SOCKETS,
    map_name::INBOUND_POLICY,
    map_name::INBOUND_LISTENERS,
    map_name::NODE_ADDRESSES,
    map_name::INBOUND_DECISIONS,
];

/// Loaded and attached programs plus their maps. Dropping it detaches the cgroup programs
/// unless their links were handed to a successor, so an agent that dies leaves none attached;
/// only inbound capture's links are pinned, to outlive it (see `capture.rs`).
pub struct EbpfRedirect {
    cgroup: PathBuf,
    /// Open for attaching at [`Self::activate`].
    cgroup_file: File,
    enrolled: Mutex<HashMap<MapData, u64, Enrollment>>,
    pending: HashMap<MapData, u64, OriginalDst>,
    original_dst: HashMap<MapData, ConnKey, OriginalDst>,
    decisions: PerCpuArray<MapData, u64>,
    /// Sockets on the fast path (both ends of redirected connections).
    sockets: SockHash<MapData, SockKey>,
    agent_sockets: Arc<AgentSockets>,
    /// Second descriptors of [`SHARED_MAPS`], for a successor.
    shared_maps: Vec<(&'static str, OwnedFd)>,
    links: Mutex<Links>,
    socket_fast_path: bool,
    /// Inbound capture, when asked for.
    capture: Option<Capture>,
    ebpf: Mutex<Ebpf>,
}

/// The cgroup links that run the programs.
enum Links {
    /// Running this agent's programs, by program name.
    Attached(Vec<(&'static str, OwnedFd)>),
    /// A predecessor's, still running its programs until [`EbpfRedirect::activate`].
    Inherited(Vec<(String, OwnedFd)>),
}

/// The kernel's `AGENT_SOCKETS` map: the agent's own upstream sockets, by cookie, which
/// `connect4`/`connect6` let pass once (and remove). One insert per new upstream connection.
pub struct AgentSockets {
    cookies: Mutex<HashMap<MapData, u64, u8>>,
}

impl AgentSockets {
    /// Puts `socket`'s cookie in the map; call it after creating the socket, before `connect`.
    pub fn exempt(&self, socket: &socket2::Socket) -> io::Result<()> {
        let cookie = rustix::net::sockopt::socket_cookie(socket)?;
        self.cookies
            .lock()
            .expect("agent sockets map lock")
            .insert(cookie, 1, 0)
            .map_err(|error| {
                io::Error::other(format!(
                    "cannot exempt the agent's socket from the redirect (kernel map {}): {error}",
                    map_name::AGENT_SOCKETS
                ))
            })
    }
}

impl fmt::Debug for AgentSockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(map_name::AGENT_SOCKETS)
    }
}

impl EbpfRedirect {
    /// Checks the host, loads the programs and attaches them to `cgroup` (default: the root of
    /// the cgroup v2 mount). `socket_fast_path` puts redirected connections on the sk_msg fast
    /// path.
    ///
    /// With a predecessor's kernel state (`inherited`), the programs are loaded against its maps
    /// and attached only by [`Self::activate`], which switches its links over to them.
    ///
    /// `capture_pins`: inbound capture is wanted, its links pinned there (on bpffs).
    pub fn attach(
        cgroup: Option<&Path>,
        socket_fast_path: bool,
        inherited: Inherited,
        capture_pins: Option<&Path>,
    ) -> Result<EbpfRedirect, RedirectError> {
        // First: without programs there is nothing to check the host for.
        let object = embedded_object(EBPF_OBJECT, NOT_EMBEDDED)?;
        let cgroup = preflight::check(cgroup)?;
        let cgroup_file = File::open(&cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.clone(),
            source,
        })?;
        let fast_path = u32::from(socket_fast_path);
        let cold = inherited.links.is_empty();
        let mut ebpf = if inherited.maps.is_empty() {
            EbpfLoader::new()
                .override_global(global_name::FAST_PATH, &fast_path, true)
                .load(object)?
        } else {
            reuse::load(
                object,
                &[(global_name::FAST_PATH, fast_path)],
                inherited.maps,
            )?
        };
        let shared_maps = SHARED_MAPS
            .into_iter()
            .map(|name| Ok((name, map_fd(&ebpf, name)?)))
            .collect::<Result<Vec<_>, RedirectError>>()?;
        // The message verdict goes on the socket map before any socket can join it.
        let sockets: SockHash<MapData, SockKey> = ebpf
            .take_map(map_name::SOCKETS)
            .ok_or(RedirectError::Missing(map_name::SOCKETS))?
            .try_into()
            .map_err(|source| RedirectError::Map {
                map: map_name::SOCKETS,
                source,
            })?;
        let sk_msg = sk_msg_program(&mut ebpf)?;
        sk_msg.load().map_err(sk_msg_error)?;
        if cold {
            sk_msg.attach(sockets.fd()).map_err(sk_msg_error)?;
        }
        let mut attached = Vec::new();
        for (program, hook, which) in PROGRAMS {
            let hook_error = |source| RedirectError::Hook {
                hook,
                program,
                source,
            };
            let prog = ebpf
                .program_mut(program)
                .ok_or(RedirectError::Missing(program))?;
            if which == Hook::SockOps {
                let prog: &mut SockOps = prog.try_into().map_err(hook_error)?;
                prog.load().map_err(hook_error)?;
            } else {
                let prog: &mut CgroupSockAddr = prog.try_into().map_err(hook_error)?;
                prog.load().map_err(hook_error)?;
            }
            if cold {
                attached.push((program, attach(&ebpf, &cgroup_file, program, hook, which)?));
            }
        }
        let links = if cold {
            Links::Attached(attached)
        } else {
            Links::Inherited(inherited.links)
        };
        let capture = match capture_pins {
            Some(pins) => Some(Capture::new(pins, capture_parts(&mut ebpf)?)?),
            None => None,
        };
        Ok(EbpfRedirect {
            cgroup,
            cgroup_file,
            enrolled: Mutex::new(take_hash_map(&mut ebpf, map_name::ENROLLED)?),
            pending: take_hash_map(&mut ebpf, map_name::PENDING)?,
            original_dst: take_hash_map(&mut ebpf, map_name::ORIGINAL_DST)?,
            decisions: PerCpuArray::try_from(
                ebpf.take_map(map_name::DECISIONS)
                    .ok_or(RedirectError::Missing(map_name::DECISIONS))?,
            )
            .map_err(|source| RedirectError::Map {
                map: map_name::DECISIONS,
                source,
            })?,
            sockets,
            agent_sockets: Arc::new(AgentSockets {
                cookies: Mutex::new(take_hash_map(&mut ebpf, map_name::AGENT_SOCKETS)?),
            }),
            shared_maps,
            links: Mutex::new(links),
            socket_fast_path,
            capture,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Inbound capture, if it was asked for.
    pub fn capture(&self) -> Option<&Capture> {
        self.capture.as_ref()
    }

    /// Puts this agent's programs in force: switches each link inherited from a predecessor
    /// to this agent's program for its hook, in one step per hook. A hook the predecessor did
    /// not attach gets a link of its own; one this agent has no program for is detached. Does
    /// nothing when the programs were attached at start.
    pub fn activate(&self) -> Result<(), RedirectError> {
        let mut links = self.links.lock().expect("links lock");
        let Links::Inherited(inherited) = &mut *links else {
            return Ok(());
        };
        let mut inherited: BTreeMap<String, OwnedFd> =
            std::mem::take(inherited).into_iter().collect();
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let mut attached = Vec::new();
        for (program, hook, which) in PROGRAMS {
            let link = match inherited.remove(program) {
                Some(link) => {
                    let prog_fd = program_fd(&ebpf, program, hook)?;
                    link::update(link.as_fd(), prog_fd).map_err(|source| RedirectError::Link {
                        hook,
                        program,
                        source,
                    })?;
                    link
                }
                None => attach(&ebpf, &self.cgroup_file, program, hook, which)?,
            };
            attached.push((program, link));
        }
        for program in inherited.keys() {
            tracing::info!(%program, "detaching the predecessor's program this agent has none for");
        }
        if self.socket_fast_path {
            // Replaces the predecessor's verdict on the shared socket map.
            sk_msg_program(&mut ebpf)?
                .attach(self.sockets.fd())
                .map_err(sk_msg_error)?;
        }
        *links = Links::Attached(attached);
        Ok(())
    }

    /// Second descriptors of the shared maps and of the links, for a successor. Before
    /// [`Self::activate`] the links are still the predecessor's business: none are given.
    pub fn kernel_state(&self) -> io::Result<Inherited> {
        let maps = self
            .shared_maps
            .iter()
            .map(|(name, fd)| Ok(((*name).to_owned(), fd.try_clone()?)))
            .collect::<io::Result<_>>()?;
        let links = match &*self.links.lock().expect("links lock") {
            Links::Attached(links) => links
                .iter()
                .map(|(name, fd)| Ok(((*name).to_owned(), fd.try_clone()?)))
                .collect::<io::Result<_>>()?,
            Links::Inherited(_) => Vec::new(),
        };
        Ok(Inherited { maps, links })
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts redirecting new connections from the namespace with `netns_cookie` to
    /// `listener`. The listener must exist first: without it the programs fail open.
    pub fn enroll(&self, netns_cookie: u64, listener: SocketAddrV4) -> Result<(), RedirectError> {
        let value = Enrollment {
            listen_ip4: u32::from_ne_bytes(listener.ip().octets()),
            listen_port: listener.port().to_be(),
            _pad: 0,
        };
        self.enrolled
            .lock()
            .expect("enrollment map lock")
            .insert(netns_cookie, value, 0)
            .map_err(|source| RedirectError::Map {
                map: map_name::ENROLLED,
                source,
            })
    }

    /// Stops redirecting new connections from that namespace. Idempotent.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), RedirectError> {
        match self
            .enrolled
            .lock()
            .expect("enrollment map lock")
            .remove(&netns_cookie)
        {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map {
                map: map_name::ENROLLED,
                source,
            }),
        }
    }

    /// Where the connection from `client_port` in the namespace `netns_cookie` was going.
    pub fn original_dst(&self, netns_cookie: u64, client_port: u16) -> Option<SocketAddrV4> {
        let key = ConnKey {
            netns_cookie,
            client_port: u32::from(client_port),
            _pad: 0,
        };
        let dst = self.original_dst.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            Ipv4Addr::from(dst.ip4.to_ne_bytes()),
            u16::from_be(dst.port),
        ))
    }

    /// Each decision's count, summed over CPUs, in `Decision::ALL` order.
    pub fn decision_counts(&self) -> [(Decision, u64); Decision::COUNT as usize] {
        Decision::ALL.map(|decision| {
            let total = self
                .decisions
                .get(&(decision as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (decision, total)
        })
    }

    /// Entries now held by the original-destination maps (pending, established).
    pub fn map_occupancy(&self) -> (usize, usize) {
        (
            self.pending.keys().count(),
            self.original_dst.keys().count(),
        )
    }

    /// The map the agent's upstream sockets are exempted through.
    pub fn agent_sockets(&self) -> Arc<AgentSockets> {
        Arc::clone(&self.agent_sockets)
    }

    /// Sockets now on the fast path: two per redirected connection.
    pub fn fast_path_sockets(&self) -> usize {
        self.sockets.keys().count()
    }
}

/// The embedded object, or the refusal to start when the build had none to embed.
fn embedded_object(
    object: &'static [u8],
    not_embedded: Option<&'static str>,
) -> Result<&'static [u8], RedirectError> {
    match not_embedded {
        Some(reason) => Err(RedirectError::NotBuilt { reason }),
        None => Ok(object),
    }
}

/// Attaches the loaded `program` to `cgroup` at `which` with a link of our own.
fn attach(
    ebpf: &Ebpf,
    cgroup: &File,
    program: &'static str,
    hook: &'static str,
    which: Hook,
) -> Result<OwnedFd, RedirectError> {
    let prog_fd = program_fd(ebpf, program, hook)?;
    link::create(prog_fd, cgroup.as_fd(), which).map_err(|source| RedirectError::Link {
        hook,
        program,
        source,
    })
}

/// Loads the `sk_lookup` program and takes the maps inbound capture works with.
fn capture_parts(ebpf: &mut Ebpf) -> Result<CaptureParts, RedirectError> {
    let program = program_name::SK_LOOKUP;
    let hook_error = |source| RedirectError::Hook {
        hook: "sk_lookup",
        program,
        source,
    };
    let prog: &mut SkLookup = ebpf
        .program_mut(program)
        .ok_or(RedirectError::Missing(program))?
        .try_into()
        .map_err(hook_error)?;
    prog.load().map_err(hook_error)?;
    let program = prog
        .fd()
        .map_err(hook_error)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| RedirectError::Link {
            hook: "sk_lookup",
            program,
            source,
        })?;
    let listeners = ebpf
        .take_map(map_name::INBOUND_LISTENERS)
        .ok_or(RedirectError::Missing(map_name::INBOUND_LISTENERS))?
        .try_into()
        .map_err(|source| RedirectError::Map {
            map: map_name::INBOUND_LISTENERS,
            source,
        })?;
    Ok(CaptureParts {
        program,
        policy: take_hash_map(ebpf, map_name::INBOUND_POLICY)?,
        listeners,
        node_addresses: take_hash_map(ebpf, map_name::NODE_ADDRESSES)?,
        decisions: PerCpuArray::try_from(
            ebpf.take_map(map_name::INBOUND_DECISIONS)
                .ok_or(RedirectError::Missing(map_name::INBOUND_DECISIONS))?,
        )
        .map_err(|source| RedirectError::Map {
            map: map_name::INBOUND_DECISIONS,
            source,
        })?,
    })
}

/// The socket fast path's message verdict program.
fn sk_msg_program(ebpf: &mut Ebpf) -> Result<&mut SkMsg, RedirectError> {
    ebpf.program_mut(program_name::SK_MSG)
        .ok_or(RedirectError::Missing(program_name::SK_MSG))?
        .try_into()
        .map_err(sk_msg_error)
}

fn sk_msg_error(source: aya::programs::ProgramError) -> RedirectError {
    RedirectError::Hook {
        hook: "sk_msg",
        program: program_name::SK_MSG,
        source,
    }
}

fn program_fd<'a>(
    ebpf: &'a Ebpf,
    program: &'static str,
    hook: &'static str,
) -> Result<std::os::fd::BorrowedFd<'a>, RedirectError> {
    let prog = ebpf
        .program(program)
        .ok_or(RedirectError::Missing(program))?;
    let fd = prog.fd().map_err(|source| RedirectError::Hook {
        hook,
        program,
        source,
    })?;
    Ok(fd.as_fd())
}

/// A second descriptor of the map `name` (one of the kinds in [`SHARED_MAPS`]).
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, RedirectError> {
    let data = match ebpf.map(name).ok_or(RedirectError::Missing(name))? {
        Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::SockHash(data) => data,
        _ => return Err(RedirectError::Missing(name)),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| RedirectError::Handover(format!("map {name}: {source}")))
}

fn take_hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, RedirectError> {
    let map = ebpf.take_map(name).ok_or(RedirectError::Missing(name))?;
    HashMap::try_from(map).map_err(|source| RedirectError::Map { map: name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_built_without_the_object_refuses_and_says_what_to_run() {
        let error = embedded_object(&[], Some("no eBPF object at /src/mesh-ebpf/target/x"))
            .expect_err("no object, no start");
        assert_eq!(
            error.to_string(),
            "this mesh-agent was built without its eBPF programs (no eBPF object at \
             /src/mesh-ebpf/target/x): run `cargo xtask build-ebpf`, then build again"
        );
        let object: &'static [u8] = b"\x7fELF";
        assert_eq!(embedded_object(object, None).unwrap(), object);
    }
}
