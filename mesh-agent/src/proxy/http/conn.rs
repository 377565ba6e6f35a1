//! One downstream HTTP connection and how it entered the mesh: what every request on it shares.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::head_check::Verdicts;
use crate::{
    discovery::ServiceTarget,
    proxy::{pod::PodContext, Shared},
    state::Store,
    telemetry::{Caller, Telemetry},
};

/// One downstream HTTP connection: a pod's redirected connection to a service port, or a
/// connection to the ingress gateway.
pub struct HttpConn {
    pub pod: Arc<PodContext>,
    pub entry: Entry,
    pub store: Arc<Store>,
    pub telemetry: Arc<Telemetry>,
    /// The calling pod as telemetry names it, with its interned metric labels.
    pub caller: Arc<Caller>,
    /// The head checker's verdict on each request head, in order.
    pub(super) verdicts: Verdicts,
    /// The node's bounds and budgets.
    pub(crate) shared: Arc<Shared>,
    /// One permit per request-body byte this connection holds buffered.
    pub(super) body_bytes: Arc<Semaphore>,
}

/// How the request entered the mesh.
pub enum Entry {
    /// A pod dialled this service port (its VIP).
    Service { target: ServiceTarget },
    /// The ingress gateway's listener on this port: routed by `Gateway`-bound rules.
    Ingress { port: u16 },
}

impl Entry {
    /// The port the client dialled (the service's, or the ingress listener's).
    pub fn port(&self) -> u16 {
        match self {
            Entry::Service { target } => target.port,
            Entry::Ingress { port } => *port,
        }
    }
}

impl HttpConn {
    pub(crate) fn new(
        pod: Arc<PodContext>,
        entry: Entry,
        store: Arc<Store>,
        telemetry: Arc<Telemetry>,
        caller: Arc<Caller>,
        shared: Arc<Shared>,
    ) -> Self {
        HttpConn {
            pod,
            entry,
            store,
            telemetry,
            caller,
            verdicts: Verdicts::default(),
            body_bytes: Arc::new(Semaphore::new(shared.limits.body_buffer_per_connection)),
            shared,
        }
    }
}
