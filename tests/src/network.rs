//! A simulated cluster network: N [`SimNode`]s, each with a pod subnet and bridge of its own,
//! joined by an underlay, with routes on every node to every other node's pod subnet through
//! that node's underlay address, as a host-gateway CNI (flannel's `host-gw`, Calico without
//! encapsulation) sets them up. A pod reaches a pod of another node by its pod IP, unchanged
//! (no NAT, no tunnel), and the nodes reach each other by their underlay addresses.
//!
//! ```text
//!   host namespace (untouched: no link, address or route of ours)
//!   ─────────────────────────────────────────────────────────────────────────────────────
//!   underlay netns mt-<pid>-<n>-underlay: br0, no address, no uplink
//!    ├─ veth1 ── eth0 10.78.0.1/24  node 1 (mt-<pid>-<n+1>): br0 10.77.1.1/24, pods 10.77.1.2…
//!    │                              routes 10.77.2.0/24 via 10.78.0.2, …; forwarding on
//!    └─ veth2 ── eth0 10.78.0.2/24  node 2 (mt-<pid>-<n+2>): br0 10.77.2.1/24, pods 10.77.2.2…
//!                                   routes 10.77.1.0/24 via 10.78.0.1, …; forwarding on
//! ```
//!
//! The underlay's namespace is named like a node's (the network's own [`NodeId`]), so leftover
//! detection and the sweep of dead processes' leftovers ([`crate::leftovers_of`],
//! [`crate::sweep_all_stale`]) cover it as they cover nodes.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use crate::cleanup::{self, NodeId};
use crate::simnode::{PodSubnet, Uplink};
use crate::{netns, SimNode};

/// The underlay's subnet: node `i` (from 1) is `10.78.0.i`.
const UNDERLAY_PREFIX: [u8; 3] = [10, 78, 0];
const UNDERLAY_PREFIX_LEN: u8 = 24;

/// N nodes joined by an underlay. Dropping it drops its nodes (those no one else holds an `Arc`
/// of) and removes the underlay.
pub struct SimNetwork {
    id: NodeId,
    underlay: String,
    nodes: Vec<Arc<SimNode>>,
}

impl SimNetwork {
    /// The most nodes a network has: one /24 of 10.77.0.0/16 each, numbered from 1.
    pub const MAX_NODES: usize = 254;

    /// Creates the underlay and `nodes` nodes on it (1 to [`Self::MAX_NODES`]): node `i` (from 1)
    /// has the pod subnet `10.77.i.0/24` behind its bridge `10.77.i.1` and the underlay address
    /// `10.78.0.i`. Needs root.
    pub fn new(nodes: usize) -> Result<Self> {
        if !(1..=Self::MAX_NODES).contains(&nodes) {
            bail!(
                "a simulated network has 1 to {} nodes, not {nodes}",
                Self::MAX_NODES
            );
        }
        if !crate::is_root() {
            bail!("a simulated network needs root (network namespaces, cgroups)");
        }
        cleanup::sweep_stale_once();
        let id = NodeId::next();
        let mut network = Self {
            id,
            underlay: id.underlay_netns(),
            nodes: Vec::with_capacity(nodes),
        };
        // If a step fails, dropping `network` removes what the earlier steps made.
        network
            .setup(nodes)
            .with_context(|| format!("creating simulated network {id}"))?;
        Ok(network)
    }

    fn setup(&mut self, nodes: usize) -> Result<()> {
        netns::add(&self.underlay)?;
        let ns = self.underlay.as_str();
        netns::ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        netns::ip(&["-n", ns, "link", "set", "br0", "up"])?;
        for number in 1..=nodes {
            let octet = u8::try_from(number).context("node number")?;
            let subnet = PodSubnet {
                bridge: Ipv4Addr::new(10, 77, octet, 1),
                prefix_len: 24,
            };
            let [a, b, c] = UNDERLAY_PREFIX;
            let uplink = Uplink {
                underlay_netns: self.underlay.clone(),
                underlay_end: format!("veth{number}"),
                ip: Ipv4Addr::new(a, b, c, octet),
                prefix_len: UNDERLAY_PREFIX_LEN,
            };
            self.nodes
                .push(Arc::new(SimNode::create(subnet, Some(uplink))?));
        }
        for node in &self.nodes {
            for other in &self.nodes {
                if Arc::ptr_eq(node, other) {
                    continue;
                }
                let via = other
                    .underlay_ip()
                    .context("a network's node has an uplink")?;
                node.add_route(&other.pod_cidr(), via)?;
            }
        }
        Ok(())
    }

    /// `<pid>-<n>`: embedded in the underlay's name; each node has its own ([`SimNode::id`]).
    pub fn id(&self) -> String {
        self.id.to_string()
    }

    /// The ids of the network and of each of its nodes: what [`crate::leftovers_of`] takes.
    pub fn ids(&self) -> Vec<String> {
        std::iter::once(self.id())
            .chain(self.nodes.iter().map(|node| node.id()))
            .collect()
    }

    /// The underlay's network namespace name.
    pub fn underlay_netns_name(&self) -> &str {
        &self.underlay
    }

    pub fn nodes(&self) -> &[Arc<SimNode>] {
        &self.nodes
    }

    /// Node `index`, from 0: the one with the pod subnet `10.77.<index + 1>.0/24`.
    pub fn node(&self, index: usize) -> Result<&Arc<SimNode>> {
        self.nodes.get(index).with_context(|| {
            format!(
                "the network has {} nodes, no node {index} (from 0)",
                self.nodes.len()
            )
        })
    }

    /// The node whose pod subnet holds `ip`.
    pub fn node_of_pod_ip(&self, ip: Ipv4Addr) -> Option<&Arc<SimNode>> {
        self.nodes.iter().find(|node| node.owns_pod_ip(ip))
    }

    /// [`SimNode::add_host`] on every node.
    pub fn add_host(&self, name: &str, ip: Ipv4Addr) -> Result<()> {
        for node in &self.nodes {
            node.add_host(name, ip)?;
        }
        Ok(())
    }
}

impl Drop for SimNetwork {
    fn drop(&mut self) {
        // The nodes first: their processes keep their namespaces (and uplinks) alive.
        self.nodes.clear();
        if let Err(error) = netns::delete(&self.underlay) {
            eprintln!("tearing down network {}: {error:#}", self.id);
        }
    }
}

/// Checks, without sending anything, that nothing of the simulated networks is in the host
/// namespace: no address, route or link of ours. Returns what it found otherwise.
pub fn host_namespace_is_untouched() -> Result<()> {
    let addresses = netns::ip(&["-o", "-4", "addr"])?;
    let routes = netns::ip(&["-4", "route", "show", "table", "all"])?;
    let links = netns::ip(&["-o", "link"])?;
    let mut found = Vec::new();
    for (what, text) in [("address", &addresses), ("route", &routes)] {
        found.extend(
            text.lines()
                .filter(|line| line.contains("10.77.") || line.contains("10.78."))
                .map(|line| format!("{what}: {line}")),
        );
    }
    found.extend(
        links
            .lines()
            .filter(|line| line.contains("veth") || line.contains(": br0"))
            .map(|line| format!("link: {line}")),
    );
    ensure!(
        found.is_empty(),
        "the host namespace has what belongs in simulated nodes:\n{}",
        found.join("\n")
    );
    Ok(())
}
