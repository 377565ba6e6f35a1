//! One endpoint of a cluster and its live state: what balancing reads, pool permits count on
//! and clusters are built from. Below `balance`, `pool` and `cluster`, so they share it without
//! importing each other.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use http::uri::Authority;

use super::outlier::EndpointHealth;
use crate::identity::WorkloadIdentity;

/// Live state of one endpoint in one cluster; kept across reloads while the endpoint stays.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    /// Attempts in flight (LEAST_REQUEST's load).
    pub(crate) active: AtomicU32,
    pub(crate) health: EndpointHealth,
}

#[derive(Debug)]
pub(crate) struct ClusterEndpoint {
    pub(crate) addr: SocketAddr,
    /// `addr` as a URI authority, made once here rather than for every try.
    pub(crate) authority: Authority,
    /// The workload serving there, when discovery knows its pod (for telemetry).
    pub(crate) workload: Option<Arc<WorkloadIdentity>>,
    pub(crate) state: Arc<EndpointState>,
}

/// `ip:port` (`[ip]:port` for IPv6) as a URI authority.
pub(crate) fn authority_of(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).expect("a socket address is a valid authority")
}
