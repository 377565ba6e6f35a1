//! The pod a connection comes from, as the proxy carries its traffic.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::Semaphore;

use super::upstream::{Dialer, Tunnels, UpstreamPool};
use crate::{
    identity::WorkloadIdentity,
    redirect::{netns::NetNs, Exemption},
    state::Snapshot,
    telemetry::{same_arc, Caller},
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
    /// The pod as telemetry names it: a new connection reuses it, and its interned labels,
    /// while the identity stays the same.
    caller: Mutex<Option<KnownCaller>>,
}

/// A pod's [`Caller`], with the `Pod` object's identity it was made from (`None`: discovery
/// had none), as of the snapshot `version`.
struct KnownCaller {
    made_from: Option<Arc<WorkloadIdentity>>,
    version: u64,
    caller: Arc<Caller>,
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
            caller: Mutex::new(None),
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
    pub fn caller(&self, snapshot: &Snapshot) -> Arc<Caller> {
        let mut cached = self.caller.lock().unwrap_or_else(PoisonError::into_inner);
        // Most connections arrive with the snapshot the last one saw: no lookup at all.
        if let Some(known) = cached.as_ref().filter(|c| c.version == snapshot.version) {
            return Arc::clone(&known.caller);
        }
        let known = snapshot
            .discovered
            .pod(&self.namespace, &self.name)
            .map(|workload| &workload.identity);
        if let Some(cached) = cached.as_mut() {
            if same_arc(cached.made_from.as_ref(), known) {
                cached.version = snapshot.version;
                return Arc::clone(&cached.caller);
            }
        }
        let identity = known.cloned().unwrap_or_else(|| {
            let labels = Default::default();
            Arc::new(WorkloadIdentity::from_pod_labels(
                &self.name,
                &self.namespace,
                &labels,
            ))
        });
        let caller = Arc::new(Caller::new(identity));
        *cached = Some(KnownCaller {
            made_from: known.cloned(),
            version: snapshot.version,
            caller: Arc::clone(&caller),
        });
        caller
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{engine::EngineSettings, state::Store};

    fn pod_object(version: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: client-0, namespace: shop, labels: \
             {{app: client, version: {version}}}}}\nstatus: {{podIP: 10.77.0.9}}\n"
        )
    }

    #[test]
    fn a_pods_connections_share_its_caller_while_its_identity_stays_the_same() {
        let store = Store::open(None, EngineSettings::default(), &mut Registry::default())
            .expect("an empty store");
        let pod = PodContext::new("client-0".into(), "shop".into(), None, Exemption::None);

        // No Pod object: named after the pod itself, and kept while there is none.
        let unknown = pod.caller(&store.snapshot());
        assert_eq!(unknown.identity().workload, "client-0");
        assert!(Arc::ptr_eq(&unknown, &pod.caller(&store.snapshot())));

        store.apply("pod.yml", &pod_object("v1")).expect("the pod");
        let v1 = pod.caller(&store.snapshot());
        assert_eq!(v1.identity().version, "v1");
        assert!(Arc::ptr_eq(&v1, &pod.caller(&store.snapshot())));

        store
            .apply("pod.yml", &pod_object("v2"))
            .expect("the pod relabelled");
        let v2 = pod.caller(&store.snapshot());
        assert_eq!(v2.identity().version, "v2");
        assert!(Arc::ptr_eq(&v2, &pod.caller(&store.snapshot())));
    }
}
