//! The engine's view of services and their endpoints.
//!
//! Discovery (a later issue) fills these from Kubernetes `Service`, `EndpointSlice` and `Pod`
//! objects; tests build them by hand. They are plain data: the engine compiles them into its
//! snapshot and never looks at them again.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

pub use crate::identity::CLUSTER_SUFFIX;
use crate::identity::{ServiceIdentity, WorkloadIdentity};

/// Every service the mesh knows about.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub services: Vec<Arc<Service>>,
}

/// A Kubernetes `Service`: its ports and all its ready endpoints (the "default" set a request
/// goes to when no rule narrows it down).
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Its name, namespace and host; shared with every cluster of the service, which hands it
    /// to telemetry as the request's destination.
    pub identity: Arc<ServiceIdentity>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// A service port and the port its endpoints listen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// One ready backend (a pod IP) with the pod's labels, which subsets select on.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub labels: BTreeMap<String, String>,
    /// The workload serving there (its pod's), for telemetry; `None` when its pod is unknown.
    pub workload: Option<Arc<WorkloadIdentity>>,
}

impl Service {
    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> &str {
        &self.identity.host
    }

    /// The service port a request on `port` uses: that port if the service has it, otherwise
    /// its first port (a single-port service answers on any port, as a sidecar listener does).
    pub(crate) fn port_for(&self, port: u16) -> Option<ServicePort> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .or_else(|| self.ports.first())
            .copied()
    }
}

/// Longest host name we resolve (DNS limit); longer names never match anything.
const MAX_HOST: usize = 253;

/// A host name on the stack, so resolving the request's authority never allocates.
pub(crate) struct HostBuf {
    bytes: [u8; MAX_HOST],
    len: usize,
}

impl HostBuf {
    pub(crate) fn new() -> Self {
        HostBuf {
            bytes: [0; MAX_HOST],
            len: 0,
        }
    }

    fn push(&mut self, s: &str) -> Option<()> {
        let end = self.len.checked_add(s.len()).filter(|&e| e <= MAX_HOST)?;
        for (dst, src) in self.bytes[self.len..end].iter_mut().zip(s.bytes()) {
            *dst = src.to_ascii_lowercase();
        }
        self.len = end;
        Some(())
    }

    /// Replaces the contents with `host`, lower-cased and without a trailing dot.
    pub(crate) fn set(&mut self, host: &str) -> Option<&str> {
        self.len = 0;
        self.push(host.strip_suffix('.').unwrap_or(host))?;
        Some(self.as_str())
    }

    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: `push` copies whole `&str`s or nothing, and lower-casing ASCII keeps UTF-8
        // valid. Checking again took ~120 instructions a request.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[..self.len]) }
    }
}

/// Resolves a host as written in a rule or a request to its lower-case fully qualified name,
/// the one place the engine expands short names:
///
/// - `service-c` (no dot) in namespace `default` ⇒ `service-c.default.svc.cluster.local`;
/// - `service-c.ns` (one dot) ⇒ `service-c.ns.svc.cluster.local`;
/// - `service-c.ns.svc` ⇒ `service-c.ns.svc.cluster.local`;
/// - anything else (FQDNs, external names, wildcards) unchanged, minus a trailing dot.
///
/// A one-dot name may also be an external host (`example.com`); callers that care look up the
/// name as written as well (see `RouteTable::lookup`). Returns `None` if the result is longer
/// than a DNS name may be.
pub(crate) fn resolve_host<'b>(
    host: &str,
    namespace: &str,
    buf: &'b mut HostBuf,
) -> Option<&'b str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    buf.len = 0;
    buf.push(host)?;
    if host.starts_with('*') {
        return Some(buf.as_str());
    }
    match host.bytes().filter(|&b| b == b'.').count() {
        0 => {
            buf.push(".")?;
            buf.push(namespace)?;
            buf.push(".")?;
            buf.push(CLUSTER_SUFFIX)?;
        }
        1 => {
            buf.push(".")?;
            buf.push(CLUSTER_SUFFIX)?;
        }
        2 if host.to_ascii_lowercase().ends_with(".svc") => {
            buf.push(".cluster.local")?;
        }
        _ => {}
    }
    Some(buf.as_str())
}

/// [`resolve_host`] into a new `String`, for compile time.
pub(crate) fn resolve_host_owned(host: &str, namespace: &str) -> String {
    let mut buf = HostBuf::new();
    resolve_host(host, namespace, &mut buf)
        .unwrap_or(host)
        .to_owned()
}

/// The host part of an authority (`host:port`, `[v6]:port`), without allocating.
pub(crate) fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(authority, |(h, _)| h);
    }
    // The port is the digits after the last `:`. Counted from the end byte by byte: a port
    // is a few bytes, where `rsplit_once(':')` sets up a word-wise search (~150 instructions,
    // and every request asks twice).
    let port = authority
        .bytes()
        .rev()
        .take_while(u8::is_ascii_digit)
        .count();
    let before_port = &authority[..authority.len() - port];
    before_port.strip_suffix(':').unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_expand_against_the_namespace() {
        let cases = [
            (
                "service-c",
                "default",
                "service-c.default.svc.cluster.local",
            ),
            (
                "Service-C",
                "default",
                "service-c.default.svc.cluster.local",
            ),
            (
                "service-c.prod",
                "default",
                "service-c.prod.svc.cluster.local",
            ),
            (
                "service-c.prod.svc",
                "x",
                "service-c.prod.svc.cluster.local",
            ),
            (
                "service-c.prod.svc.cluster.local",
                "x",
                "service-c.prod.svc.cluster.local",
            ),
            (
                "service-c.prod.svc.cluster.local.",
                "x",
                "service-c.prod.svc.cluster.local",
            ),
            ("api.example.org", "x", "api.example.org"),
            ("*", "x", "*"),
            ("*.example.org", "x", "*.example.org"),
        ];
        for (host, ns, want) in cases {
            assert_eq!(resolve_host_owned(host, ns), want, "{host} in {ns}");
        }
    }

    #[test]
    fn authority_host_strips_the_port() {
        assert_eq!(authority_host("service-c:8080"), "service-c");
        assert_eq!(authority_host("service-c"), "service-c");
        assert_eq!(authority_host("[fd00::1]:80"), "fd00::1");
        assert_eq!(authority_host("a:b"), "a:b");
        assert_eq!(authority_host("service-c:"), "service-c");
        assert_eq!(authority_host("10.0.0.7:80"), "10.0.0.7");
        assert_eq!(authority_host("8080"), "8080");
        assert_eq!(authority_host("[fd00::1]"), "fd00::1");
    }
}
