//! Names of what a node creates, and removal of what dead test processes left behind.
//!
//! Every name embeds the creating process's pid and a per-process counter (a [`NodeId`]), so
//! leftovers of a process that no longer exists (killed before its `Drop` ran) can be recognised
//! and removed safely while other test processes keep running. A [`crate::SimNetwork`]'s underlay
//! is named the same way (`mt-<pid>-<n>-underlay`), so all of this covers it too; its links go
//! with the namespaces (each veth pair with either end's namespace).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use anyhow::Result;

use crate::{cgroup, netns};

/// Prefix of network namespace names (and `/etc/netns` directories): short, so a node's name
/// (`mt-<pid>-<n>`) fits in 15 characters like an interface name.
const NETNS_PREFIX: &str = "mt-";
/// Prefix of cgroup directory names under the cgroup2 mount.
const CGROUP_PREFIX: &str = "mesh-test-";
/// Where each node's own BPF filesystem is mounted, in a directory named as its namespace: the
/// agents on that node pin their inbound capture there (`--bpf-pin-dir`), and unmounting it
/// removes whatever they pinned.
pub(crate) const BPFFS_DIR: &str = "/run/mesh-tests/bpffs";

/// Identifies one simulated node: the creating process and a counter within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NodeId {
    pub pid: u32,
    pub seq: u32,
}

impl NodeId {
    pub fn next() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Self {
            pid: std::process::id(),
            seq: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub fn netns(self) -> String {
        format!("{NETNS_PREFIX}{self}")
    }

    pub fn pod_netns(self, pod: &str) -> String {
        format!("{NETNS_PREFIX}{self}-{pod}")
    }

    /// The namespace of a network's underlay, whose id this is.
    pub fn underlay_netns(self) -> String {
        format!("{NETNS_PREFIX}{self}-underlay")
    }

    pub fn cgroup_dir(self) -> String {
        format!("{CGROUP_PREFIX}{self}")
    }

    /// The id embedded in one of our names, or `None` for names that are not ours.
    fn parse(name: &str, prefix: &str) -> Option<Self> {
        let mut parts = name.strip_prefix(prefix)?.splitn(3, '-');
        let pid = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        Some(Self { pid, seq })
    }

    fn creator_is_alive(self) -> bool {
        Path::new("/proc").join(self.pid.to_string()).exists()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pid, self.seq)
    }
}

/// One thing of ours that exists on the machine.
struct Leftover {
    owner: NodeId,
    kind: Kind,
    name: String,
}

enum Kind {
    Netns,
    EtcNetns,
    Cgroup,
    Bpffs,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Netns => write!(f, "network namespace {}", self.name),
            Kind::EtcNetns => write!(f, "{}", netns::etc_dir(&self.name).display()),
            Kind::Cgroup => write!(f, "cgroup {}", self.path().display()),
            Kind::Bpffs => write!(f, "bpffs {}", self.path().display()),
        }
    }
}

impl Leftover {
    fn path(&self) -> std::path::PathBuf {
        match self.kind {
            Kind::Netns => netns::path(&self.name),
            Kind::EtcNetns => netns::etc_dir(&self.name),
            Kind::Cgroup => cgroup::cgroup2_mount()
                .map(|mount| mount.join(&self.name))
                .unwrap_or_default(),
            Kind::Bpffs => Path::new(BPFFS_DIR).join(&self.name),
        }
    }

    fn remove(&self) -> Result<()> {
        match self.kind {
            // Removes the /etc/netns directory of the same name too.
            Kind::Netns | Kind::EtcNetns => netns::delete(&self.name),
            Kind::Cgroup => cgroup::remove(&self.path()),
            Kind::Bpffs => remove_bpffs(&self.path()),
        }
    }
}

fn all_leftovers() -> Vec<Leftover> {
    let mut found = Vec::new();
    let mut collect = |names: Vec<String>, prefix: &str, kind: fn() -> Kind| {
        for name in names {
            if let Some(owner) = NodeId::parse(&name, prefix) {
                found.push(Leftover {
                    owner,
                    kind: kind(),
                    name,
                });
            }
        }
    };
    collect(netns::entries(netns::RUN_DIR), NETNS_PREFIX, || Kind::Netns);
    collect(netns::entries(netns::ETC_DIR), NETNS_PREFIX, || {
        Kind::EtcNetns
    });
    if let Ok(mount) = cgroup::cgroup2_mount() {
        let dirs = netns::entries(&mount.to_string_lossy());
        collect(dirs, CGROUP_PREFIX, || Kind::Cgroup);
    }
    collect(netns::entries(BPFFS_DIR), NETNS_PREFIX, || Kind::Bpffs);
    found
}

/// Mounts a BPF filesystem of its own at `dir` (made if missing).
pub(crate) fn mount_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "mount -t bpf bpf {}: {status}",
        dir.display()
    );
    Ok(())
}

/// Unmounts the BPF filesystem at `dir`, which frees what was pinned there, and removes `dir`.
pub(crate) fn remove_bpffs(dir: &Path) -> Result<()> {
    // Lazily: a process may still have it open; the pins go once nothing does.
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(dir)
        .status()?;
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(anyhow::anyhow!("removing {}: {error}", dir.display())),
    }
}

/// Everything of ours (namespaces, `/etc/netns` directories, cgroups) that exists now, of any
/// node of any process, described for a human.
pub fn leftovers() -> Vec<String> {
    all_leftovers().iter().map(ToString::to_string).collect()
}

/// What still exists of the node or network with this id ([`crate::SimNode::id`],
/// [`crate::SimNetwork::ids`]); empty after its drop.
pub fn leftovers_of(node_id: &str) -> Vec<String> {
    all_leftovers()
        .iter()
        .filter(|leftover| leftover.owner.to_string() == node_id)
        .map(ToString::to_string)
        .collect()
}

/// Removes everything of ours whose creating process no longer exists, and returns what it
/// removed. Safe to run while other test processes are running; `cargo xtask test` runs it after
/// the suite.
pub fn sweep_all_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for leftover in all_leftovers() {
        // Deleting a namespace also removed its /etc/netns directory.
        if leftover.owner.creator_is_alive() || !leftover.path().exists() {
            continue;
        }
        match leftover.remove() {
            Ok(()) => removed.push(leftover.to_string()),
            Err(error) => errors.push(format!("{leftover}: {error:#}")),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("could not remove stale leftovers:\n{}", errors.join("\n"));
    }
    Ok(removed)
}

/// Sweeps once per process, before its first node.
pub(crate) fn sweep_stale_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| match sweep_all_stale() {
        Ok(removed) if !removed.is_empty() => {
            eprintln!("removed leftovers of dead test processes: {removed:?}");
        }
        Ok(_) => {}
        Err(error) => eprintln!("{error:#}"),
    });
}
