//! HBONE, as Istio ambient's ztunnel speaks it: a connection between two pods of the mesh goes
//! from the source pod's agent to the destination pod's agent inside an HTTP/2 `CONNECT` stream
//! over mutual TLS 1.3, on the destination pod's address, port 15008.
//!
//! - `outbound`: a source pod's tunnels. When the engine's chosen endpoint is a pod in the mesh,
//!   the upstream dial ([`crate::proxy::upstream::Dialer`]) opens a `CONNECT podIP:port` stream
//!   on a pooled HTTP/2 connection (one per source identity, destination pod IP and destination
//!   identity) instead of a TCP connection; everything above the dial is unchanged.
//! - `inbound`: for each enrolled pod, a listener on port 15008 inside the pod's network
//!   namespace: it checks the client's certificate, accepts `CONNECT` to this pod's own address
//!   only, and delivers the bytes to the app from inside the pod.
//!
//! Identities are SPIFFE IDs, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`,
//! from the pods' `Pod` objects (discovery); certificates come from one
//! [`CertificateStore`].

mod inbound;
mod metrics;
mod outbound;
mod stream;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::registry::Registry;

pub use inbound::{serve as serve_inbound, InboundPod};
pub use metrics::TunnelMetrics;
pub use outbound::{Source, TunnelClient, TunnelError};

use crate::{
    discovery::{Workload, DEFAULT_SERVICE_ACCOUNT},
    identity::{
        certificates::CertificateStore,
        spiffe::{SpiffeId, TrustDomain},
    },
    inbound::InboundLimits,
    state::{Snapshot, Store},
    telemetry::Telemetry,
};

/// HBONE's port, Istio's: where every pod of the mesh accepts tunnels.
pub const PORT: u16 = 15008;

/// What the tunnels of one agent share: the certificates, where identities are looked up, and
/// what they report.
pub struct Hbone {
    store: Arc<Store>,
    certificates: Arc<CertificateStore>,
    telemetry: Arc<Telemetry>,
    metrics: TunnelMetrics,
    limits: InboundLimits,
    /// Identities in use whatever pods are enrolled: the ingress gateway's.
    kept: Mutex<Vec<SpiffeId>>,
}

impl Hbone {
    /// Registers the tunnels' own metrics on `registry` (the agent's `mesh` sub-registry).
    pub fn new(
        store: Arc<Store>,
        certificates: Arc<CertificateStore>,
        telemetry: Arc<Telemetry>,
        limits: InboundLimits,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let metrics = TunnelMetrics::default();
        metrics.register(registry.sub_registry_with_prefix("tunnel"));
        Arc::new(Hbone {
            store,
            certificates,
            telemetry,
            metrics,
            limits,
            kept: Mutex::new(Vec::new()),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.certificates.trust_bundle().trust_domain()
    }

    pub fn certificates(&self) -> &Arc<CertificateStore> {
        &self.certificates
    }

    pub fn metrics(&self) -> &TunnelMetrics {
        &self.metrics
    }

    /// Where the pods' identities and policies are looked up.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// What is reported, and where.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn limits(&self) -> &InboundLimits {
        &self.limits
    }

    /// The identity of pod `namespace/name`: its service account's, `default` while discovery
    /// has no `Pod` object for it (as Kubernetes runs a pod that names none). `None` for names
    /// that cannot be a SPIFFE ID's.
    pub fn pod_identity(
        &self,
        snapshot: &Snapshot,
        namespace: &str,
        name: &str,
    ) -> Option<SpiffeId> {
        let account = snapshot
            .discovered
            .pod(namespace, name)
            .map_or(DEFAULT_SERVICE_ACCOUNT, |workload| {
                workload.service_account.as_str()
            });
        SpiffeId::new(self.trust_domain().clone(), namespace, account).ok()
    }

    /// Keeps `identity`'s certificate whatever pods are enrolled.
    pub fn keep_identity(&self, identity: SpiffeId) {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(identity);
    }

    /// Forgets the certificates of identities that neither a kept one nor any of the `enrolled`
    /// pods (namespace, name) has: a signer would refuse to renew them once their pods left
    /// this node, and a certificate that expired while its renewal failed makes the agent
    /// unready.
    pub fn forget_unused_identities<'a>(
        &self,
        enrolled: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        let snapshot = self.snapshot();
        let mut used: Vec<SpiffeId> = enrolled
            .into_iter()
            .filter_map(|(namespace, name)| self.pod_identity(&snapshot, namespace, name))
            .collect();
        used.extend(
            self.kept
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        for identity in self.certificates.identities() {
            if !used.contains(&identity) && self.certificates.forget(&identity) {
                tracing::debug!(%identity, "no enrolled pod has this identity: forgotten");
            }
        }
    }

    /// The identity a tunnel to `workload` expects of it, when it is in the mesh; `None`: the
    /// connection goes in plaintext (Istio's PERMISSIVE).
    pub fn workload_identity(&self, workload: &Workload) -> Option<SpiffeId> {
        if !workload.in_mesh {
            return None;
        }
        SpiffeId::new(
            self.trust_domain().clone(),
            &workload.identity.namespace,
            &workload.service_account,
        )
        .ok()
    }

    /// The identity expected at `endpoint`, when a tunnel carries connections there.
    pub fn destination(&self, snapshot: &Snapshot, endpoint: SocketAddr) -> Option<SpiffeId> {
        let workload = snapshot.discovered.workload_at(endpoint.ip())?;
        self.workload_identity(workload)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.store.snapshot()
    }
}
