//! Inbound capture (eBPF mode): the `sk_lookup` program on each captured pod's network
//! namespace hands TCP connections arriving at the pod's addresses to the agent's inbound
//! listener in the pod, or refuses plaintext to a STRICT port (`mesh-ebpf/src/inbound.rs`).
//!
//! Unlike the cgroup programs, each pod's link is pinned on bpffs (`<pin dir>/netns-<cookie>`),
//! so that it outlives the agent: a STRICT port must not take plaintext while no agent judges
//! it. While the agent is down the pinned program runs on with the maps it was loaded with;
//! its listener is gone from them (the kernel drops a closed socket), so PERMISSIVE ports reach
//! the app directly and STRICT ports refuse. The next agent fills its own maps, then switches
//! each pinned link to its own program in one step (`BPF_LINK_UPDATE`).
//!
//! A pin goes when its pod is unenrolled, at start for namespaces that no longer exist, and
//! once the agent has enrolled the pods it serves for pods it did not (they left the mesh while
//! no agent ran); an agent that shuts down keeps them (it may be restarting). Removing the pin
//! directory undoes everything (`rm -r /sys/fs/bpf/mesh`).

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, SockHash};
use mesh_common::{
    map_name, program_name, InboundDecision, InboundKey, PlaintextInbound, NODE_ADDRESSES_CAPACITY,
};

use super::{
    addresses::own_addresses,
    error::RedirectError,
    link::{self, Hook},
    netns::NetNs,
};

/// `statfs` magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What plaintext meets at one pod: a mode for every port, some ports their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaintextPolicy {
    pub default: PlaintextInbound,
    pub ports: BTreeMap<u16, PlaintextInbound>,
}

impl Default for PlaintextPolicy {
    /// Captured everywhere: Istio's default is PERMISSIVE.
    fn default() -> Self {
        PlaintextPolicy {
            default: PlaintextInbound::Capture,
            ports: BTreeMap::new(),
        }
    }
}

impl PlaintextPolicy {
    /// What plaintext to `port` meets.
    pub fn mode(&self, port: u16) -> PlaintextInbound {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

/// The kernel maps of inbound capture, the program, and the pods captured.
pub struct Capture {
    pin_dir: PathBuf,
    program: OwnedFd,
    policy: Mutex<HashMap<MapData, InboundKey, u32>>,
    listeners: Mutex<SockHash<MapData, u32>>,
    node_addresses: Mutex<HashMap<MapData, u32, u32>>,
    decisions: PerCpuArray<MapData, u64>,
    captured: Mutex<BTreeMap<u64, Captured>>,
}

/// One captured pod: what was written for it, and its link.
struct Captured {
    addresses: Vec<Ipv4Addr>,
    policy: PlaintextPolicy,
    _link: OwnedFd,
}

/// The loaded program and maps [`Capture`] works with.
pub struct CaptureParts {
    pub program: OwnedFd,
    pub policy: HashMap<MapData, InboundKey, u32>,
    pub listeners: SockHash<MapData, u32>,
    pub node_addresses: HashMap<MapData, u32, u32>,
    pub decisions: PerCpuArray<MapData, u64>,
}

impl Capture {
    /// Pins go in `pin_dir`, which must be on a BPF filesystem (created if missing). Pins of
    /// namespaces that are gone are removed; the node's addresses are written.
    pub fn new(pin_dir: &Path, parts: CaptureParts) -> Result<Capture, RedirectError> {
        let pin_error = |source: io::Error| RedirectError::Pin {
            path: pin_dir.to_path_buf(),
            source,
        };
        mount_node_bpffs_if_missing(pin_dir).map_err(pin_error)?;
        std::fs::create_dir_all(pin_dir).map_err(pin_error)?;
        if !on_bpffs(pin_dir).map_err(pin_error)? {
            return Err(pin_error(io::Error::other(
                "not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass \
                 --bpf-pin-dir inside one",
            )));
        }
        prune_defunct(pin_dir);
        let capture = Capture {
            pin_dir: pin_dir.to_path_buf(),
            program: parts.program,
            policy: Mutex::new(parts.policy),
            listeners: Mutex::new(parts.listeners),
            node_addresses: Mutex::new(parts.node_addresses),
            decisions: parts.decisions,
            captured: Mutex::new(BTreeMap::new()),
        };
        capture.write_node_addresses()?;
        Ok(capture)
    }

    fn pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join(format!("netns-{cookie}"))
    }

    /// Captures TCP arriving at `addresses` in `netns` (cookie `cookie`): `listener` (the
    /// agent's, in that namespace) takes it, except what `policy` refuses.
    pub fn capture(
        &self,
        netns: &NetNs,
        cookie: u64,
        addresses: &[Ipv4Addr],
        listener: BorrowedFd<'_>,
        policy: &PlaintextPolicy,
    ) -> Result<(), RedirectError> {
        // Our entries first, then the switch: the program never runs on half of them.
        self.write_node_addresses()?;
        self.write_policy(addresses, None, policy)?;
        {
            let mut listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for address in addresses {
                listeners
                    .insert(ip4_key(*address), listener, 0)
                    .map_err(|source| map_error(map_name::INBOUND_LISTENERS, source))?;
            }
        }
        let link_error = |source| RedirectError::Link {
            hook: "sk_lookup",
            program: program_name::SK_LOOKUP,
            source,
        };
        let pin = self.pin(cookie);
        let link = match link::open_pinned(&pin).map_err(link_error)? {
            Some(link) => {
                link::update(link.as_fd(), self.program.as_fd()).map_err(link_error)?;
                link
            }
            None => {
                let link = link::create(self.program.as_fd(), netns.as_fd(), Hook::SkLookup)
                    .map_err(link_error)?;
                link::pin(link.as_fd(), &pin).map_err(|source| RedirectError::Pin {
                    path: pin.clone(),
                    source,
                })?;
                link
            }
        };
        self.captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                cookie,
                Captured {
                    addresses: addresses.to_vec(),
                    policy: policy.clone(),
                    _link: link,
                },
            );
        Ok(())
    }

    /// What plaintext to the pod `cookie` meets from now on (its policies changed).
    pub fn set_policy(&self, cookie: u64, policy: &PlaintextPolicy) -> Result<(), RedirectError> {
        let mut captured = self.captured.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(pod) = captured.get_mut(&cookie) else {
            return Ok(());
        };
        if pod.policy != *policy {
            self.write_policy(&pod.addresses, Some(&pod.policy), policy)?;
            pod.policy = policy.clone();
        }
        Ok(())
    }

    /// Writes `policy` for `addresses`, removing the port overrides of `written` (what was
    /// written before, if anything) it no longer has. All or nothing: when the map is full
    /// halfway, what this call wrote is undone (`written` again, or no entry), so a pod keeps
    /// the policy it had and no entry is left behind.
    fn write_policy(
        &self,
        addresses: &[Ipv4Addr],
        written: Option<&PlaintextPolicy>,
        policy: &PlaintextPolicy,
    ) -> Result<(), RedirectError> {
        let mut map = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        let error = |source| map_error(map_name::INBOUND_POLICY, source);
        let entries = |policy: &PlaintextPolicy| -> Vec<(u16, PlaintextInbound)> {
            policy
                .ports
                .iter()
                .map(|(port, mode)| (*port, *mode))
                .chain([(0, policy.default)])
                .collect()
        };
        let wanted = entries(policy);
        let before = written.map(entries).unwrap_or_default();
        for (done, address) in addresses.iter().enumerate() {
            for (index, (port, mode)) in wanted.iter().enumerate() {
                if let Err(source) = map.insert(inbound_key(*address, *port), *mode as u32, 0) {
                    // Undo: this address's entries so far, and every address before it.
                    let undo = addresses[..done]
                        .iter()
                        .map(|address| (address, &wanted[..]))
                        .chain([(address, &wanted[..index])]);
                    for (address, inserted) in undo {
                        for (port, _) in inserted {
                            let _ = remove(&mut map, &inbound_key(*address, *port));
                        }
                        // Overwriting a key the map holds needs no room.
                        for (port, mode) in &before {
                            let _ = map.insert(inbound_key(*address, *port), *mode as u32, 0);
                        }
                    }
                    return Err(error(source));
                }
            }
        }
        for address in addresses {
            for (port, _) in before.iter().filter(|(p, _)| !policy.ports.contains_key(p)) {
                if *port != 0 {
                    remove(&mut map, &inbound_key(*address, *port)).map_err(error)?;
                }
            }
        }
        Ok(())
    }

    /// Stops capturing the pod `cookie` (it leaves the mesh): its pin and entries go.
    pub fn release(&self, cookie: u64) -> Result<(), RedirectError> {
        match std::fs::remove_file(self.pin(cookie)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RedirectError::Pin {
                    path: self.pin(cookie),
                    source,
                })
            }
        }
        let Some(pod) = self
            .captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cookie)
        else {
            return Ok(());
        };
        let mut policy = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for address in &pod.addresses {
            for port in pod.policy.ports.keys().copied().chain([0]) {
                remove(&mut policy, &inbound_key(*address, port))
                    .map_err(|source| map_error(map_name::INBOUND_POLICY, source))?;
            }
            match listeners.remove(&ip4_key(*address)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(map_name::INBOUND_LISTENERS, source)),
            }
        }
        Ok(())
    }

    /// Removes the pins of pods this agent has not captured: pods that left the mesh while no
    /// agent ran (their namespaces live on, so `prune_defunct` kept them). Call it once the
    /// pods to serve are all enrolled: one agent per pin directory.
    pub fn prune_unclaimed(&self) {
        let captured = self.captured.lock().unwrap_or_else(PoisonError::into_inner);
        let Ok(entries) = std::fs::read_dir(&self.pin_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let cookie = name
                .to_str()
                .and_then(|name| name.strip_prefix("netns-"))
                .and_then(|cookie| cookie.parse::<u64>().ok());
            if cookie.is_some_and(|cookie| !captured.contains_key(&cookie)) {
                tracing::info!(pin = %entry.path().display(), "removing the capture of a pod no longer enrolled");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The node's own addresses (the agent runs in the node's network namespace), from which
    /// the kubelet probes pods: never captured.
    fn write_node_addresses(&self) -> Result<(), RedirectError> {
        let addresses = own_addresses().map_err(|source| RedirectError::Netns {
            path: PathBuf::from("/proc/self/ns/net"),
            source,
        })?;
        let mut map = self
            .node_addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let error = |source| map_error(map_name::NODE_ADDRESSES, source);
        let addresses = within_capacity(&addresses);
        // Gone first, so that the map has room for the new.
        let held: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for gone in held
            .into_iter()
            .filter(|key| !addresses.iter().any(|a| ip4_key(*a) == *key))
        {
            remove(&mut map, &gone).map_err(error)?;
        }
        for address in addresses {
            map.insert(ip4_key(*address), 1, 0).map_err(error)?;
        }
        Ok(())
    }

    /// Each inbound decision's count, summed over CPUs.
    pub fn decision_counts(&self) -> [(InboundDecision, u64); InboundDecision::COUNT as usize] {
        InboundDecision::ALL.map(|decision| {
            let total = self
                .decisions
                .get(&(decision as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (decision, total)
        })
    }
}

/// The node's usual bpffs mount point, which systemd mounts at boot on most distributions.
const NODE_BPFFS: &str = "/sys/fs/bpf";

fn on_bpffs(path: &Path) -> io::Result<bool> {
    let magic = rustix::fs::statfs(path)?.f_type;
    Ok(magic == BPF_FS_MAGIC)
}

/// Mounts the node's bpffs at `/sys/fs/bpf` when `pin_dir` is under it and nothing is mounted
/// there, as Cilium does (the node's `/sys/fs/bpf` exists wherever sysfs does). A pin directory
/// elsewhere is the operator's to mount.
fn mount_node_bpffs_if_missing(pin_dir: &Path) -> io::Result<()> {
    let node = Path::new(NODE_BPFFS);
    if !pin_dir.starts_with(node) || on_bpffs(node)? {
        return Ok(());
    }
    rustix::mount::mount("bpf", node, "bpf", rustix::mount::MountFlags::empty(), None)?;
    tracing::info!(
        path = NODE_BPFFS,
        "mounted the node's BPF filesystem (it was not)"
    );
    Ok(())
}

/// Removes the pins in `dir` whose network namespace is gone (its pod ended while no agent
/// ran): the link does nothing any more, but the pin would keep it, and its maps, alive.
fn prune_defunct(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let defunct = match link::open_pinned(&path) {
            Ok(Some(link)) => link::netns_inode(link.as_fd()).is_ok_and(|inode| inode == 0),
            _ => false,
        };
        if defunct {
            tracing::info!(pin = %path.display(), "removing the capture of a namespace that is gone");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The node addresses the kernel's map can hold: the first [`NODE_ADDRESSES_CAPACITY`]. A
/// connection from one left out is captured as any other client's (so a STRICT port refuses
/// a probe from it): said once per start.
fn within_capacity(addresses: &[Ipv4Addr]) -> &[Ipv4Addr] {
    let capacity = NODE_ADDRESSES_CAPACITY as usize;
    if addresses.len() > capacity {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                addresses = addresses.len(),
                capacity,
                left_out = ?&addresses[capacity..],
                "the node has more IPv4 addresses than the capture's exemption holds: \
                 connections from those left out are captured like any client's, and a STRICT \
                 port refuses them"
            );
        });
    }
    &addresses[..addresses.len().min(capacity)]
}

fn ip4_key(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

fn inbound_key(address: Ipv4Addr, port: u16) -> InboundKey {
    InboundKey {
        ip4: ip4_key(address),
        port: u32::from(port),
    }
}

fn remove<K: aya::Pod>(map: &mut HashMap<MapData, K, u32>, key: &K) -> Result<(), MapError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(error) => Err(error),
    }
}

fn map_error(map: &'static str, source: MapError) -> RedirectError {
    RedirectError::Map { map, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_of_its_own_wins_over_the_pods_default() {
        let policy = PlaintextPolicy {
            default: PlaintextInbound::Refuse,
            ports: [(8080, PlaintextInbound::Capture)].into(),
        };
        assert_eq!(policy.mode(8080), PlaintextInbound::Capture);
        assert_eq!(policy.mode(9090), PlaintextInbound::Refuse);
        assert_eq!(
            PlaintextPolicy::default().mode(1),
            PlaintextInbound::Capture
        );
    }

    #[test]
    fn node_addresses_past_the_maps_capacity_are_left_out() {
        let addresses: Vec<Ipv4Addr> = (0..NODE_ADDRESSES_CAPACITY + 6)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        let kept = within_capacity(&addresses);
        assert_eq!(kept.len(), NODE_ADDRESSES_CAPACITY as usize);
        assert_eq!(kept, &addresses[..kept.len()]);
        assert_eq!(within_capacity(&addresses[..3]), &addresses[..3]);
    }
}
