//! A simulated node: a network namespace with a bridge, pods behind it, and a cgroup holding
//! every process the test starts there.
//!
//! ```text
//!   host namespace (untouched: no link, address or route of ours)
//!   ───────────────────────────────────────────────────────────────
//!   node netns mt-<pid>-<n>           cgroup <cgroup2>/mesh-test-<pid>-<n>
//!     lo, br0 10.77.0.1/16
//!      ├─ veth1 ── eth0 10.77.0.2/16  pod netns mt-<pid>-<n>-<pod>
//!      └─ veth2 ── eth0 10.77.0.3/16  ...
//! ```
//!
//! A node of its own ([`SimNode::new`]) has no uplink and the pod subnet 10.77.0.0/16: every such
//! node uses the same addresses, and they never meet, each being its own namespace. The nodes of
//! a [`crate::SimNetwork`] each have a /24 of their own and an `eth0` on the network's underlay.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::cleanup::{self, NodeId};
use crate::process::{self, Placement, PodProcess};
use crate::{cgroup, netns};

/// The pod subnet of a node of its own: its bridge's address, the pods' default gateway, and the
/// prefix length.
const SINGLE_NODE_SUBNET: PodSubnet = PodSubnet {
    bridge: Ipv4Addr::new(10, 77, 0, 1),
    prefix_len: 16,
};
/// Pods have no DNS: lookups of names missing from their hosts file go to the pod's own loopback,
/// get refused and fail fast, and never leave the pod.
const RESOLV_CONF: &str = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

/// A simulated node. Dropping it (also while a test panics) kills every process in its cgroup and
/// removes its cgroup, namespaces (with their links) and `/etc/netns` files.
pub struct SimNode {
    id: NodeId,
    netns: String,
    cgroup: PathBuf,
    subnet: PodSubnet,
    uplink: Option<Uplink>,
    state: Mutex<State>,
}

/// A node's pod subnet: the bridge's address (its first host) and the prefix length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PodSubnet {
    pub bridge: Ipv4Addr,
    pub prefix_len: u8,
}

impl PodSubnet {
    fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// The subnet's own address, e.g. `10.77.1.0`.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.bridge) & self.mask())
    }

    /// `10.77.1.0/24`.
    pub fn cidr(self) -> String {
        format!("{}/{}", self.network(), self.prefix_len)
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Host number `host` of the subnet, if it is below the broadcast address.
    fn host(self, host: u32) -> Option<Ipv4Addr> {
        (host > 0 && host < !self.mask()).then(|| Ipv4Addr::from(u32::from(self.network()) | host))
    }
}

/// A node's link to an underlay: `eth0` in the node, its peer on the underlay's bridge.
#[derive(Clone, Debug)]
pub(crate) struct Uplink {
    /// The underlay's network namespace.
    pub underlay_netns: String,
    /// The peer's name in the underlay (unique there).
    pub underlay_end: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Default)]
struct State {
    pods: Vec<Pod>,
    /// Extra `/etc/hosts` entries of every pod, from [`SimNode::add_host`].
    hosts: Vec<(String, Ipv4Addr)>,
}

/// A pod: a network namespace behind the node's bridge. Cheap to clone; it lives as long as its
/// node.
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    netns: String,
}

impl Pod {
    /// The name given to [`SimNode::add_pod`]; other pods resolve it to [`Pod::ip`].
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:port` on this pod's address.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/var/run/netns/<ns>`: what the agent's `--enroll` takes.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }

    fn hosts_file(&self) -> PathBuf {
        netns::etc_dir(&self.netns).join("hosts")
    }
}

impl SimNode {
    /// Creates a node of its own: its namespace, bridge (10.77.0.1/16) and cgroup, with no
    /// uplink. Needs root. The first call in a process first removes what dead test processes
    /// left behind.
    pub fn new() -> Result<Self> {
        Self::create(SINGLE_NODE_SUBNET, None)
    }

    /// Creates a node with `subnet` behind its bridge and, given an `uplink`, an `eth0` on that
    /// underlay with IP forwarding on (the routes to other nodes are the caller's).
    pub(crate) fn create(subnet: PodSubnet, uplink: Option<Uplink>) -> Result<Self> {
        if !crate::is_root() {
            bail!("a simulated node needs root (network namespaces, cgroups)");
        }
        cleanup::sweep_stale_once();
        let id = NodeId::next();
        let node = Self {
            id,
            netns: id.netns(),
            cgroup: cgroup::cgroup2_mount()?.join(id.cgroup_dir()),
            subnet,
            uplink,
            state: Mutex::default(),
        };
        // If a step fails, dropping `node` removes what the earlier steps made.
        node.setup()
            .with_context(|| format!("creating simulated node {id}"))?;
        Ok(node)
    }

    fn setup(&self) -> Result<()> {
        cgroup::create(&self.cgroup)?;
        cleanup::mount_bpffs(&self.bpffs_dir())?;
        netns::add(&self.netns)?;
        let ns = self.netns.as_str();
        let bridge_ip = format!("{}/{}", self.subnet.bridge, self.subnet.prefix_len);
        netns::ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        netns::ip(&["-n", ns, "addr", "add", &bridge_ip, "dev", "br0"])?;
        netns::ip(&["-n", ns, "link", "set", "br0", "up"])?;
        if let Some(uplink) = &self.uplink {
            let underlay = uplink.underlay_netns.as_str();
            let end = uplink.underlay_end.as_str();
            // Made in the underlay with its peer moved straight into the node, as pods' links
            // are: nothing appears in the host namespace. Deleting the node's namespace deletes
            // the pair.
            netns::ip(&[
                "-n", underlay, "link", "add", end, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            netns::ip(&["-n", underlay, "link", "set", end, "master", "br0", "up"])?;
            let address = format!("{}/{}", uplink.ip, uplink.prefix_len);
            netns::ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])?;
            netns::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            // A router between its pods and the underlay, as a host-gateway CNI makes nodes.
            // /proc/sys/net is the namespace of the thread that opens it.
            netns::run_in(&self.netns_path(), || {
                fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            })?
            .context("turning IP forwarding on")?;
        }
        Ok(())
    }

    /// Routes `subnet` (a CIDR) through `via`, an address on the node's underlay.
    pub(crate) fn add_route(&self, subnet: &str, via: Ipv4Addr) -> Result<()> {
        let via = via.to_string();
        netns::ip(&[
            "-n",
            &self.netns,
            "route",
            "add",
            subnet,
            "via",
            &via,
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    /// The node's address on its bridge: the pods' default gateway, where they reach the node
    /// (its ingress gateway, say).
    pub fn ip(&self) -> Ipv4Addr {
        self.subnet.bridge
    }

    /// The node's address on its network's underlay, if it is part of a [`crate::SimNetwork`].
    pub fn underlay_ip(&self) -> Option<Ipv4Addr> {
        self.uplink.as_ref().map(|uplink| uplink.ip)
    }

    /// The address the cluster knows the node by (its `Node`'s InternalIP, its pods' hostIP):
    /// its underlay address, else its bridge's.
    pub fn internal_ip(&self) -> Ipv4Addr {
        self.underlay_ip().unwrap_or(self.ip())
    }

    /// The node's pod subnet, e.g. `10.77.1.0/24` (a `Node`'s `spec.podCIDR`).
    pub fn pod_cidr(&self) -> String {
        self.subnet.cidr()
    }

    /// Whether `ip` is in the node's pod subnet.
    pub fn owns_pod_ip(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(ip)
    }

    /// `<pid>-<n>`: embedded in every name this node uses; see [`crate::leftovers_of`].
    pub fn id(&self) -> String {
        self.id.to_string()
    }

    /// The node's own BPF filesystem, where its agents pin inbound capture (`--bpf-pin-dir`):
    /// unmounted, with all they pinned, when the node goes.
    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(cleanup::BPFFS_DIR).join(&self.netns)
    }

    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/var/run/netns/<ns>` of the node itself.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }

    /// The node's cgroup: every spawned process is in it; the agent attaches its programs here.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// Moves a process into `relative` below the node's cgroup (created if needed), e.g.
    /// `kubepods/besteffort/pod<uid>/c1` to look like a kubelet-managed container.
    pub fn move_to_cgroup(&self, pid: u32, relative: &str) -> Result<PathBuf> {
        let path = self.cgroup.join(relative);
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        fs::write(path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", path.display()))?;
        Ok(path)
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.state.lock().unwrap().pods.clone()
    }

    /// Adds a pod `name` (lowercase letters, digits and `-`, unique in this node) with the next
    /// free address of the node's subnet, from its second host on (10.77.0.2 for a node of its
    /// own).
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if name.is_empty() || name.len() > 63 || !name.chars().all(valid) {
            bail!("pod name {name:?}: use 1 to 63 lowercase letters, digits and '-'");
        }
        let mut state = self.state.lock().unwrap();
        if state.pods.iter().any(|pod| pod.name == name) {
            bail!("pod {name:?} already exists on node {}", self.id);
        }
        // Host numbers from 2 (1 is the node) up to the last one below the broadcast address.
        let index = state.pods.len() + 1;
        let ip = u32::try_from(index + 1)
            .ok()
            .and_then(|host| self.subnet.host(host));
        let Some(ip) = ip else {
            bail!("node {} is full ({})", self.id, self.subnet.cidr());
        };
        let pod = Pod {
            name: name.to_owned(),
            ip,
            netns: self.id.pod_netns(name),
        };
        // Recorded first so that drop deletes the namespace even if a later step fails.
        state.pods.push(pod.clone());
        self.wire_pod(&pod, index)
            .with_context(|| format!("adding pod {name:?} to node {}", self.id))?;
        write_hosts_files(&state)?;
        Ok(pod)
    }

    fn wire_pod(&self, pod: &Pod, index: usize) -> Result<()> {
        netns::add(&pod.netns)?;
        let etc = netns::etc_dir(&pod.netns);
        fs::create_dir_all(&etc)?;
        fs::write(etc.join("resolv.conf"), RESOLV_CONF)?;
        let (node, pod_ns) = (self.netns.as_str(), pod.netns.as_str());
        // Created inside the node with its peer moved straight into the pod: no link ever
        // appears in the host namespace, and the node-side names only need to be unique here.
        let node_end = format!("veth{index}");
        let address = format!("{}/{}", pod.ip, self.subnet.prefix_len);
        let gateway = self.subnet.bridge.to_string();
        netns::ip(&[
            "-n", node, "link", "add", &node_end, "type", "veth", "peer", "name", "eth0", "netns",
            pod_ns,
        ])?;
        netns::ip(&["-n", node, "link", "set", &node_end, "master", "br0", "up"])?;
        netns::ip(&["-n", pod_ns, "addr", "add", &address, "dev", "eth0"])?;
        netns::ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
        netns::ip(&["-n", pod_ns, "route", "add", "default", "via", &gateway])?;
        Ok(())
    }

    /// Makes `name` resolve to `ip` in every pod, present and future (e.g. a service's virtual
    /// IP). Running processes see it too: their `/etc/hosts` is the rewritten file.
    pub fn add_host(&self, name: &str, ip: Ipv4Addr) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        state.hosts.push((name.to_owned(), ip));
        write_hosts_files(&state)
    }

    /// Starts `command` in `pod`: in the node's cgroup, the pod's network namespace, and a private
    /// mount namespace where `/etc/hosts` is the pod's (pod names and [`Self::add_host`] entries)
    /// and `/etc/resolv.conf` points at the pod's own 127.0.0.1, where no DNS server answers: other
    /// names fail at once instead of after a timeout.
    /// Stdout and stderr are captured (see [`PodProcess::stdout`]).
    ///
    /// The process is SIGKILLed when the calling *thread* exits, so spawn from the test's thread
    /// (or one that outlives the process), not from a short-lived helper thread.
    pub fn spawn_in_pod(&self, pod: &Pod, command: Command) -> Result<PodProcess> {
        let label = format!("{}@{}", program_name(&command), pod.name);
        let etc = netns::etc_dir(&pod.netns);
        let placement = Placement {
            cgroup: &self.cgroup,
            netns: &pod.netns_path(),
            etc_overrides: Some(&etc),
            label,
        };
        process::spawn(command, placement)
    }

    /// Starts `command` on the node: in its cgroup and network namespace (where the agent runs
    /// and where the node's own 127.0.0.1 is), keeping the host's mounts (bpffs, cgroup2).
    /// The same thread rule as [`Self::spawn_in_pod`] applies.
    pub fn spawn_on_node(&self, command: Command) -> Result<PodProcess> {
        let label = format!("{}@node", program_name(&command));
        let placement = Placement {
            cgroup: &self.cgroup,
            netns: &self.netns_path(),
            etc_overrides: None,
            label,
        };
        process::spawn(command, placement)
    }

    /// Runs `f` on a fresh thread inside `pod`'s network namespace and returns its result. The
    /// thread is NOT in the node's cgroup, so the agent's programs do not see its connections;
    /// and it uses the host's `/etc/hosts`. Sockets it creates stay in the pod's namespace: bind a
    /// listener here and accept on any thread.
    pub fn run_in_pod<T: Send>(&self, pod: &Pod, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(&pod.netns_path(), f)
    }

    /// Like [`Self::run_in_pod`], in the node's namespace (e.g. to reach the agent's admin port
    /// on the node's 127.0.0.1).
    pub fn run_on_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(&self.netns_path(), f)
    }

    /// Starts `f` on a background thread inside `pod`'s network namespace (a server, say).
    pub fn spawn_thread_in_pod<T, F>(&self, pod: &Pod, f: F) -> Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        netns::spawn_thread_in(&pod.netns_path(), f)
    }

    /// Starts `f` on a background thread inside the node's network namespace.
    pub fn spawn_thread_on_node<T, F>(&self, f: F) -> Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        netns::spawn_thread_in(&self.netns_path(), f)
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        // Processes first: they keep namespaces alive.
        if let Err(error) = cgroup::remove(&self.cgroup) {
            eprintln!("tearing down node {}: {error:#}", self.id);
        }
        // A test that panicked while holding the lock must still be cleaned up.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let names = state
            .pods
            .iter()
            .map(|pod| pod.netns.as_str())
            .chain([self.netns.as_str()]);
        for name in names {
            if let Err(error) = netns::delete(name) {
                eprintln!("tearing down node {}: {error:#}", self.id);
            }
        }
        if let Err(error) = cleanup::remove_bpffs(&self.bpffs_dir()) {
            eprintln!("tearing down node {}: {error:#}", self.id);
        }
    }
}

/// Rewrites every pod's hosts file in place (not by rename): running processes have the file
/// bind-mounted, and a bind mount follows the inode.
fn write_hosts_files(state: &State) -> Result<()> {
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for pod in &state.pods {
        hosts += &format!("{}\t{}\n", pod.ip, pod.name);
    }
    for (name, ip) in &state.hosts {
        hosts += &format!("{ip}\t{name}\n");
    }
    for pod in &state.pods {
        let file = pod.hosts_file();
        // A pod whose wiring failed may have no directory; it is about to be removed anyway.
        if file.parent().is_some_and(Path::exists) {
            fs::write(&file, &hosts).with_context(|| format!("writing {}", file.display()))?;
        }
    }
    Ok(())
}

/// `probe` for `/work/target/debug/probe`: labels output lines and errors.
fn program_name(command: &Command) -> String {
    let program = Path::new(command.get_program());
    program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_subnets_hand_out_hosts_below_the_broadcast_address() {
        let node = PodSubnet {
            bridge: Ipv4Addr::new(10, 77, 2, 1),
            prefix_len: 24,
        };
        assert_eq!(node.cidr(), "10.77.2.0/24");
        assert_eq!(node.host(2), Some(Ipv4Addr::new(10, 77, 2, 2)));
        assert_eq!(node.host(254), Some(Ipv4Addr::new(10, 77, 2, 254)));
        assert_eq!(node.host(255), None, "the broadcast address");
        assert_eq!(node.host(0), None, "the network's own address");
        assert!(node.contains(Ipv4Addr::new(10, 77, 2, 200)));
        assert!(!node.contains(Ipv4Addr::new(10, 77, 3, 2)));

        assert_eq!(SINGLE_NODE_SUBNET.cidr(), "10.77.0.0/16");
        assert_eq!(
            SINGLE_NODE_SUBNET.host(65534),
            Some(Ipv4Addr::new(10, 77, 255, 254))
        );
        assert_eq!(SINGLE_NODE_SUBNET.host(65535), None);
        assert!(SINGLE_NODE_SUBNET.contains(Ipv4Addr::new(10, 77, 3, 2)));
    }
}
