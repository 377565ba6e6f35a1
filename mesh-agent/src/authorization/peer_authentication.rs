//! Istio's `PeerAuthentication`, resolved per workload: which connections a pod accepts on each
//! of its ports. `STRICT`: mutual TLS only, i.e. what arrives through the mesh's tunnels;
//! plaintext connections to the pod are refused. `PERMISSIVE`: both. `DISABLE`: plaintext is
//! accepted, and so are tunnelled connections from mesh sources (the tunnel is the transport
//! between agents, not a choice the destination can refuse). Pure: the caller enforces.
//!
//! Which policy applies is Istio's rule (`ComposePeerAuthentication`):
//!
//! - a policy in the root namespace (`istio-system`) without a selector is **mesh**-wide; one in
//!   another namespace without a selector is **namespace**-wide; one with a selector applies to
//!   the **workloads** of its namespace whose labels it matches. A selector without labels is
//!   no selector. A policy with a selector in the root namespace applies to nothing (Istio
//!   ignores it; it is warned about when read).
//! - The narrowest level that has a policy decides (workload, then namespace, then mesh); a
//!   level whose mode is `UNSET` (or absent) inherits the next broader level's, and with no
//!   policy at all a pod is `PERMISSIVE`.
//! - Of several policies at one level, the **oldest** wins (`metadata.creationTimestamp`, as in
//!   Istio). Ties, and policies without a creation time, are ordered by name: a policy without
//!   a time counts as older than any with one (Istio reads a missing time as the zero time),
//!   so a folder's policies, which seldom have one, are decided by name alone.
//! - `portLevelMtls` of the winning workload policy sets the mode of single ports; a port's
//!   `UNSET` inherits the workload's resolved mode. The other workload policies that match are
//!   not merged in, as in Istio.

use std::{cmp::Ordering, collections::BTreeMap, sync::Arc};

use super::ROOT_NAMESPACE;
use crate::config::model::{PeerAuthentication, PeerMtlsMode};

/// A mode as resolved for a pod and port: never unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// Mutual TLS only: plaintext connections to the pod are refused.
    Strict,
    /// Mutual TLS and plaintext.
    Permissive,
    /// Plaintext; tunnelled connections from mesh sources are still accepted.
    Disable,
}

impl MtlsMode {
    /// `setting` at a narrower level over `self`, the broader level's mode.
    fn narrowed_by(self, setting: PeerMtlsMode) -> MtlsMode {
        match setting {
            PeerMtlsMode::Unset => self,
            PeerMtlsMode::Disable => MtlsMode::Disable,
            PeerMtlsMode::Permissive => MtlsMode::Permissive,
            PeerMtlsMode::Strict => MtlsMode::Strict,
        }
    }
}

/// What one pod accepts: `default` on every port but those of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMtls {
    pub default: MtlsMode,
    /// The ports the winning workload policy names (`portLevelMtls`), each resolved.
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl PodMtls {
    /// The mode of `port`, the port the pod listens on.
    pub fn mode(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

impl Default for PodMtls {
    /// No policy: `PERMISSIVE` everywhere.
    fn default() -> Self {
        PodMtls {
            default: MtlsMode::Permissive,
            ports: BTreeMap::new(),
        }
    }
}

/// The PeerAuthentications in force, sorted by level once so that a workload's lookup walks
/// only its own namespace's.
#[derive(Debug, Default)]
pub struct PeerAuthentications {
    /// As given, for [`PeerAuthentications::holds`].
    policies: Vec<Arc<PeerAuthentication>>,
    /// The root namespace's oldest policy without a selector.
    mesh: Option<Arc<PeerAuthentication>>,
    /// By namespace (never the root namespace).
    namespaces: BTreeMap<String, Namespace>,
}

/// One namespace's policies.
#[derive(Debug, Default)]
struct Namespace {
    /// The oldest policy without a selector.
    wide: Option<Arc<PeerAuthentication>>,
    /// The policies with a selector, oldest first.
    selecting: Vec<Arc<PeerAuthentication>>,
}

impl PeerAuthentications {
    pub fn new(policies: &[Arc<PeerAuthentication>]) -> PeerAuthentications {
        let mut by_age: Vec<&Arc<PeerAuthentication>> = policies.iter().collect();
        by_age.sort_by(|a, b| older_first(a, b));
        let mut mesh = None;
        let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
        for policy in by_age {
            let root = policy.id.namespace == ROOT_NAMESPACE;
            match (&policy.selector, root) {
                (None, true) => {
                    mesh.get_or_insert_with(|| Arc::clone(policy));
                }
                (None, false) => {
                    let namespace = namespaces.entry(policy.id.namespace.clone()).or_default();
                    namespace.wide.get_or_insert_with(|| Arc::clone(policy));
                }
                (Some(_), false) => {
                    let namespace = namespaces.entry(policy.id.namespace.clone()).or_default();
                    namespace.selecting.push(Arc::clone(policy));
                }
                // Istio ignores a workload policy in the root namespace.
                (Some(_), true) => {}
            }
        }
        PeerAuthentications {
            policies: policies.to_vec(),
            mesh,
            namespaces,
        }
    }

    /// Whether these are `policies`, the same objects or equal ones (a relist, or a file edited
    /// elsewhere, reads a policy again unchanged), so nothing changed.
    pub fn holds(&self, policies: &[Arc<PeerAuthentication>]) -> bool {
        self.policies.len() == policies.len()
            && self
                .policies
                .iter()
                .zip(policies)
                .all(|(held, other)| Arc::ptr_eq(held, other) || held == other)
    }

    /// Whether no policy applies to any workload: every pod is `PERMISSIVE` on every port.
    pub fn is_empty(&self) -> bool {
        self.mesh.is_none() && self.namespaces.is_empty()
    }

    /// What a workload of `namespace` with `labels` accepts.
    pub fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> PodMtls {
        let mut mode = MtlsMode::Permissive;
        if let Some(mesh) = &self.mesh {
            mode = mode.narrowed_by(mesh.mode);
        }
        let Some(own) = self.namespaces.get(namespace) else {
            return PodMtls {
                default: mode,
                ports: BTreeMap::new(),
            };
        };
        if let Some(wide) = &own.wide {
            mode = mode.narrowed_by(wide.mode);
        }
        let selected = own.selecting.iter().find(|policy| {
            policy.selector.as_ref().is_some_and(|selector| {
                selector
                    .iter()
                    .all(|(key, value)| labels.get(key) == Some(value))
            })
        });
        let Some(workload) = selected else {
            return PodMtls {
                default: mode,
                ports: BTreeMap::new(),
            };
        };
        let mode = mode.narrowed_by(workload.mode);
        PodMtls {
            default: mode,
            ports: workload
                .port_level
                .iter()
                .map(|(port, setting)| (*port, mode.narrowed_by(*setting)))
                .collect(),
        }
    }
}

/// Istio's precedence within a level: the older first (a missing creation time is the oldest,
/// as Istio's zero time is), then by name, then by namespace.
fn older_first(a: &PeerAuthentication, b: &PeerAuthentication) -> Ordering {
    a.created
        .cmp(&b.created)
        .then_with(|| a.id.name.cmp(&b.id.name))
        .then_with(|| a.id.namespace.cmp(&b.id.namespace))
}

#[cfg(test)]
mod tests;
