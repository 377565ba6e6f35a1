//! A pod's inbound listener: what the kernel's inbound capture hands over (plaintext arriving
//! at the pod's address from outside the mesh: a pod not enrolled, another node's host). Each
//! connection's local address is where its client was going (the capture rewrites nothing).
//!
//! The pod's PeerAuthentication decides first: STRICT refuses plaintext (the kernel already
//! does; this catches a connection accepted just before a change), PERMISSIVE and DISABLE
//! take it. Then its AuthorizationPolicies judge it as the tunnel's connections are judged,
//! with no identity: a rule that names principals or namespaces never matches plaintext.
//! Counted as the destination reports it (`reporter="destination"`, security `none`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::{
    admit, deliver, destination_labels, inspect, pod_labels, Admission, App, Arrival, InboundLimits,
};
use crate::{
    authorization::MtlsMode,
    inbound::{PodPolicies, Resettable},
    proxy::{upstream::Dialer, Drain},
    state::Store,
    telemetry::{metrics::Metrics, Metered},
};

/// The pod an inbound listener serves, and what serving it takes.
pub struct PlaintextPod {
    pub namespace: String,
    pub name: String,
    /// Dials the app from inside the pod.
    pub dialer: Dialer,
    /// Its bounds: connections held at once (`max_connections`; past it a new one is closed at
    /// once and counted), the dial to the app, and how long what they carry may idle.
    pub limits: InboundLimits,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
}

/// Serves `listener` until accepting stops (drain, handover) or the task is aborted (unenroll).
pub async fn serve(listener: TcpListener, pod: PlaintextPod, drain: Drain) {
    let name = format!("inbound {}/{}", pod.namespace, pod.name);
    let max_connections = pod.limits.max_connections;
    let pod = Arc::new(pod);
    drain
        .accept_bounded(
            listener,
            &name,
            max_connections,
            || pod.metrics.limit_hit("inbound_connections"),
            |stream, peer| {
                let pod = Arc::clone(&pod);
                async move { pod.connection(stream, peer).await }
            },
        )
        .await;
}

impl PlaintextPod {
    async fn connection(&self, stream: TcpStream, peer: SocketAddr) {
        let Ok(destination) = stream.local_addr() else {
            return;
        };
        let snapshot = self.store.snapshot();
        let pod = (self.namespace.as_str(), self.name.as_str());
        let reported_as =
            destination_labels(&snapshot, &self.metrics, pod, peer.ip(), destination, None);
        let mut client = Metered::new(stream, self.metrics.tcp_connection(&reported_as));
        let labels = pod_labels(&snapshot, &self.namespace, &self.name);
        let mode = snapshot
            .peer_authentication
            .for_workload(&self.namespace, labels)
            .mode(destination.port());
        drop(snapshot);
        if mode == MtlsMode::Strict {
            debug!(%peer, %destination, "plaintext refused: the port is STRICT");
            self.metrics.authorization_denied("peer_authentication");
            client.reset();
            return;
        }
        let arrival = Arrival {
            client: None,
            server: None,
            source: peer.ip(),
            destination,
            labels: reported_as,
        };
        let policies = Arc::new(PodPolicies::of_pod(
            &self.store,
            &self.namespace,
            &self.name,
        ));
        let app = App {
            dialer: self.dialer.clone(),
            address: destination,
            limits: self.limits,
        };
        let decision = match admit(&policies.current(), &arrival) {
            Admission::Open => {
                let dialled = match app.connect().await {
                    Ok(dialled) => dialled,
                    Err(error) => {
                        debug!(address = %app.address, %error, "the app refused the connection");
                        client.reset();
                        return;
                    }
                };
                let arrival = Arc::new(arrival);
                return deliver(client, dialled, app, policies, arrival, &self.metrics).await;
            }
            Admission::Inspect(decision) => decision,
        };
        inspect(
            client,
            decision,
            policies,
            Arc::new(arrival),
            app,
            &self.metrics,
        )
        .await;
    }
}

impl Resettable for Metered<TcpStream> {
    fn reset(&mut self) {
        // Closed with RST on drop, as a refused connection is.
        let _ = socket2::SockRef::from(&*self.inner_mut()).set_linger(Some(Duration::ZERO));
    }
}
