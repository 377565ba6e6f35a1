//! What the data path looks up in discovery: which service a VIP:port is, which workload a pod
//! IP or an enrolled pod is, and how a service port is spoken.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;
use smallvec::SmallVec;

use crate::{
    engine::registry,
    identity::{ServiceIdentity, WorkloadIdentity},
};

/// The lookups the data path makes, as of one snapshot. Cloning is O(1) (persistent maps).
#[derive(Clone, Debug, Default)]
pub struct Discovered {
    /// Service VIP and port → the service behind it.
    pub(super) services: imbl::HashMap<SocketAddr, ServiceTarget>,
    /// Pod IP → the workload running there (for telemetry and subsets).
    pub(super) workloads: imbl::HashMap<IpAddr, Arc<Workload>>,
    /// `namespace/name` → the same workloads, for enrolled pods known by name.
    pub(super) pods: imbl::HashMap<Arc<str>, Arc<Workload>>,
    /// Endpoint address and target port → the services with an endpoint there, each with its
    /// number of endpoints, for the destination's telemetry.
    endpoint_services: imbl::HashMap<SocketAddr, Vec<(Arc<ServiceIdentity>, usize)>>,
}

impl Discovered {
    pub fn service_at(&self, addr: SocketAddr) -> Option<&ServiceTarget> {
        self.services.get(&addr)
    }

    pub fn workload_at(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// The service with this fully qualified host name.
    pub fn service_named(&self, host: &str) -> Option<&ServiceIdentity> {
        self.services
            .values()
            .map(|target| &*target.service)
            .find(|service| service.host == host)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        // The key (`super::index::pod_key`) written on the stack: a lookup per connection
        // allocates nothing.
        let mut key = SmallVec::<[u8; 128]>::new();
        key.extend_from_slice(namespace.as_bytes());
        key.push(b'/');
        key.extend_from_slice(name.as_bytes());
        self.pods.get(std::str::from_utf8(&key).ok()?)
    }

    /// The service a connection to this endpoint address and port was for, as the destination
    /// names it: the service with an endpoint there (`None` when none is). A pod is often in
    /// several — its application's Service and one per version for Gateway API routes to send
    /// to (`service-c`, `service-c-v1`) — and the destination cannot tell which one the client
    /// dialled: it names the one with the most endpoints, the application's (of equals, the
    /// shortest name), so both ends of a call name the same service in the tutorial's shape.
    pub fn service_of_endpoint(&self, addr: SocketAddr) -> Option<&Arc<ServiceIdentity>> {
        self.endpoint_services
            .get(&addr)?
            .iter()
            .max_by(|(a, a_endpoints), (b, b_endpoints)| {
                a_endpoints
                    .cmp(b_endpoints)
                    .then_with(|| b.host.len().cmp(&a.host.len()))
                    .then_with(|| b.host.cmp(&a.host))
            })
            .map(|(service, _)| service)
    }

    pub(super) fn link_endpoints(&mut self, service: &registry::Service) {
        let endpoints = service.endpoints.len();
        for addr in endpoint_addresses(service) {
            let services = self.endpoint_services.entry(addr).or_default();
            services.retain(|(s, _)| *s != service.identity);
            services.push((Arc::clone(&service.identity), endpoints));
        }
    }

    pub(super) fn unlink_endpoints(&mut self, service: &registry::Service) {
        for addr in endpoint_addresses(service) {
            let Some(services) = self.endpoint_services.get_mut(&addr) else {
                continue;
            };
            services.retain(|(s, _)| *s != service.identity);
            if services.is_empty() {
                self.endpoint_services.remove(&addr);
            }
        }
    }
}

/// Every endpoint address and target port of `service`.
fn endpoint_addresses(service: &registry::Service) -> impl Iterator<Item = SocketAddr> + '_ {
    service.endpoints.iter().flat_map(|endpoint| {
        service
            .ports
            .iter()
            .map(|port| SocketAddr::new(endpoint.ip, port.target_port))
    })
}

/// A service port as a client dials it.
#[derive(Clone, Debug)]
pub struct ServiceTarget {
    pub service: Arc<ServiceIdentity>,
    pub port: u16,
    pub protocol: Protocol,
    /// `fqdn:port`: what requests to this port are routed by when their `Host` is an IP.
    pub authority: Arc<str>,
}

/// A pod: its name, labels (which subsets select on) and its identity as telemetry names it,
/// Istio style (the workload is the owning Deployment, or the pod itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub pod: String,
    pub labels: BTreeMap<String, String>,
    /// Shared with the registry's endpoints of this pod.
    pub identity: Arc<WorkloadIdentity>,
    /// In the mesh (`super::membership::in_mesh`): its agent serves a tunnel on its port
    /// 15008, so a source agent carries connections to it there over mutual TLS.
    pub in_mesh: bool,
    /// `spec.serviceAccountName` (`default` when unset): with the namespace, its SPIFFE ID.
    pub service_account: String,
}

/// How the proxy treats a service port, decided as Istio does: `appProtocol` first, then the
/// port name's prefix (`http-web`, `grpc`, `tcp-db`), otherwise detected from the first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    Detect,
}

impl Protocol {
    pub fn from_port(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
        if let Some(protocol) = app_protocol.and_then(Protocol::from_name) {
            return protocol;
        }
        name.and_then(|name| {
            let prefix = name.split(['-', '_']).next().unwrap_or(name);
            Protocol::from_name(prefix)
        })
        .unwrap_or(Protocol::Detect)
    }

    fn from_name(name: &str) -> Option<Protocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" | "http1" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "tcp" | "mongo" | "mysql" | "redis" | "tls" | "https" => Protocol::Tcp,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Protocol;

    #[test]
    fn protocol_from_app_protocol_then_name() {
        let cases = [
            (Some("http"), Some("tcp-x"), Protocol::Http),
            (Some("kubernetes.io/h2c"), None, Protocol::Http2),
            (None, Some("http-web"), Protocol::Http),
            (None, Some("grpc"), Protocol::Grpc),
            (None, Some("tcp-db"), Protocol::Tcp),
            (None, Some("web"), Protocol::Detect),
            (None, None, Protocol::Detect),
            (Some("custom"), Some("http"), Protocol::Http),
        ];
        for (app, name, want) in cases {
            assert_eq!(Protocol::from_port(app, name), want, "{app:?} {name:?}");
        }
    }
}
