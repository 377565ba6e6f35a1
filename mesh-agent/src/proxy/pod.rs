//! The pod a connection comes from, as the proxy carries its traffic.

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use super::upstream::{Dialer, Tunnels, UpstreamPool};
use crate::{
    identity::WorkloadIdentity,
    redirect::{netns::NetNs, Exemption},
    state::Snapshot,
};

/// What the proxy knows about the pod a listener serves.
pub struct PodContext {
    pub name: String,
    /// Short host names in rules and requests resolve against it.
    pub namespace: String,
    /// Dials upstreams as the pod would: from its network namespace, exempted from the redirect.
    pub dialer: Dialer,
    /// The pod's HTTP connections to its upstreams.
    pub upstream: UpstreamPool,
    /// One permit per downstream connection from this pod; sized by the proxy on first use.
    connections: OnceLock<Arc<Semaphore>>,
}

impl PodContext {
    /// `netns`: where the pod's upstream connections are made from (`None`: the agent's own
    /// namespace); `exemption`: what lets them pass the redirect ([`Exemption::None`] for a
    /// proxy that no redirect sees, as in tests).
    pub fn new(
        name: String,
        namespace: String,
        netns: Option<Arc<NetNs>>,
        exemption: Exemption,
    ) -> Self {
        let dialer = Dialer::new(netns, exemption);
        PodContext {
            upstream: UpstreamPool::new(dialer.clone()),
            dialer,
            name,
            namespace,
            connections: OnceLock::new(),
        }
    }
}

impl PodContext {
    /// Connections to pods in the mesh go through `tunnel` (this pod's tunnels).
    pub fn with_tunnel(mut self, tunnel: Arc<dyn Tunnels>) -> Self {
        self.dialer = self.dialer.with_tunnel(tunnel);
        self.upstream = UpstreamPool::new(self.dialer.clone());
        self
    }

    /// The pod's connection cap, `max` permits the first time it is asked for.
    pub(super) fn connection_cap(&self, max: usize) -> Arc<Semaphore> {
        Arc::clone(
            self.connections
                .get_or_init(|| Arc::new(Semaphore::new(max))),
        )
    }

    /// The pod as telemetry names it: from its `Pod` object if discovery has one.
    pub fn identity(&self, snapshot: &Snapshot) -> WorkloadIdentity {
        match snapshot.discovered.pod(&self.namespace, &self.name) {
            Some(workload) => (*workload.identity).clone(),
            None => {
                WorkloadIdentity::from_pod_labels(&self.name, &self.namespace, &Default::default())
            }
        }
    }
}
