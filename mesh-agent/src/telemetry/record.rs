//! One record per proxied HTTP request and per L4 connection, filled by the proxy as the
//! request goes and emitted once, when the record is dropped: metrics, span and access-log line
//! all come from it (ztunnel's `ConnectionResult`). Dropping covers every way a request ends,
//! a client that went away mid-flight included (Envoy's `DC`, status 0).

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime},
};

use foldhash::HashMap;

use http::{HeaderName, Method, Version};

use super::{
    access_log::{HttpRecord, TcpRecord},
    metrics::{
        PeerLabels, Protocol as MetricsProtocol, Reporter, RequestOutcome, Security,
        TcpConnectionMetrics,
    },
    otlp::ProxySpan,
    sinks::Telemetry,
    trace::SpanContext,
};
use crate::{
    engine::{Destination, ResponseFlags},
    identity::spiffe::Route,
    identity::{ServiceIdentity, WorkloadIdentity, UNKNOWN},
};

/// gRPC's status trailer (or header, for a trailers-only response); a constant, so a lookup
/// does not parse the name.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A calling pod as telemetry names it, shared by the records of its requests on every
/// connection for as long as its identity stays the same.
pub struct Caller {
    identity: Arc<WorkloadIdentity>,
    /// `workload.namespace`, the service name spans are grouped under (as Istio's).
    span_service: Arc<str>,
    /// Interned metric labels per upstream endpoint, with the identities they were made from:
    /// recording a request then costs no hashing of label strings and only the pod's lock,
    /// not the node's. At most
    /// [`MAX_PEERS`]: when full it starts again empty, and each endpoint is interned afresh
    /// on its next request.
    peers: Mutex<HashMap<SocketAddr, Peer>>,
}

/// How many upstream endpoints a caller keeps the labels of: a pod's working set of
/// endpoints, with room for a large service's.
pub const MAX_PEERS: usize = 1024;

struct Peer {
    service: Option<Arc<ServiceIdentity>>,
    workload: Option<Arc<WorkloadIdentity>>,
    route: Option<Route>,
    labels: Arc<PeerLabels>,
}

impl Caller {
    /// `identity`: the calling pod's workload as telemetry names it.
    pub fn new(identity: Arc<WorkloadIdentity>) -> Self {
        Caller {
            span_service: Arc::from(format!("{}.{}", identity.workload, identity.namespace)),
            identity,
            peers: Mutex::default(),
        }
    }

    pub fn identity(&self) -> &WorkloadIdentity {
        &self.identity
    }

    /// The labels of traffic to `endpoint` (of `service`, run by `workload`), interned once per
    /// endpoint for as long as the endpoint's identities stay the same (a config reload that
    /// rebuilds them makes new labels).
    fn peer(
        &self,
        telemetry: &Telemetry,
        endpoint: Option<SocketAddr>,
        service: Option<&Arc<ServiceIdentity>>,
        workload: Option<&Arc<WorkloadIdentity>>,
        route: Option<&Route>,
    ) -> Arc<PeerLabels> {
        let metrics = &telemetry.metrics;
        let intern = || {
            metrics.secured_peer_labels(
                &self.identity,
                service.map(|s| &**s),
                workload.map(|w| &**w),
                security(route),
            )
        };
        let Some(endpoint) = endpoint else {
            return intern();
        };
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(peer) = peers.get(&endpoint) {
            if same_arc(service, peer.service.as_ref())
                && same_arc(workload, peer.workload.as_ref())
                && route == peer.route.as_ref()
            {
                return Arc::clone(&peer.labels);
            }
        }
        let labels = intern();
        if peers.len() >= MAX_PEERS {
            peers.clear();
        }
        peers.insert(
            endpoint,
            Peer {
                service: service.cloned(),
                workload: workload.cloned(),
                route: route.cloned(),
                labels: Arc::clone(&labels),
            },
        );
        labels
    }
}

/// Source-side labels of traffic through `route` (or in plaintext).
fn security(route: Option<&Route>) -> Security<'_> {
    Security {
        reporter: Reporter::Source,
        principals: route.map(|route| (&route.source, &route.destination)),
    }
}

/// What the client got back.
struct Answer {
    status: u16,
    grpc_status: Option<u32>,
    /// From `Content-Length`; 0 when the body's length was not announced.
    bytes: u64,
    version: Version,
}

/// One HTTP request through the proxy. Create it when the request head is in, fill it in as
/// the request is routed and tried, and let it drop: that emits it.
pub struct RequestRecord<'a> {
    telemetry: &'a Telemetry,
    /// The calling pod's name.
    source_pod: &'a str,
    caller: &'a Caller,
    started: Instant,
    /// The port the client dialled (or the ingress listener's).
    port: u16,
    trace: SpanContext,
    method: Method,
    version: Version,
    /// Only the access log and spans show it: copied only for them.
    path: Option<Box<str>>,
    grpc: bool,
    /// The service the client dialled, which names mesh traffic's destination whatever the
    /// rules routed it to; `None` at the ingress, where the routed destination's is used.
    dialled: Option<&'a Arc<ServiceIdentity>>,
    destination: Option<Destination>,
    endpoint: Option<SocketAddr>,
    workload: Option<Arc<WorkloadIdentity>>,
    /// The tunnel of the last try, if it went through one.
    route: Option<Route>,
    flags: ResponseFlags,
    attempts: u32,
    request_bytes: u64,
    answer: Option<Answer>,
}

impl<'a> RequestRecord<'a> {
    /// Starts the record of a request whose head just arrived: continues the caller's trace or
    /// starts one (see [`Self::trace`]).
    pub fn start(
        telemetry: &'a Telemetry,
        source_pod: &'a str,
        caller: &'a Caller,
        head: &http::request::Parts,
        port: u16,
        dialled: Option<&'a Arc<ServiceIdentity>>,
    ) -> Self {
        let trace = super::trace::continue_or_start(
            &head.headers,
            telemetry.trace_sample_ratio,
            &mut fastrand::Rng::new(),
        );
        let path = (telemetry.access_log.is_enabled() || telemetry.spans.is_some())
            .then(|| head.uri.path_and_query().map_or("/", |p| p.as_str()).into());
        let grpc = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        RequestRecord {
            telemetry,
            source_pod,
            caller,
            started: Instant::now(),
            port,
            trace,
            method: head.method.clone(),
            version: head.version,
            path,
            grpc,
            dialled,
            destination: None,
            endpoint: None,
            workload: None,
            route: None,
            flags: ResponseFlags::NONE,
            attempts: 0,
            request_bytes: 0,
            answer: None,
        }
    }

    /// This hop's trace context, to propagate upstream.
    pub fn trace(&self) -> &SpanContext {
        &self.trace
    }

    pub fn set_request_bytes(&mut self, bytes: u64) {
        self.request_bytes = bytes;
    }

    /// The engine's destination for the request.
    pub fn routed(&mut self, destination: &Destination) {
        self.destination = Some(destination.clone());
    }

    /// A try started to `endpoint`, served by `workload`.
    pub fn attempt(&mut self, endpoint: SocketAddr, workload: Option<&Arc<WorkloadIdentity>>) {
        self.endpoint = Some(endpoint);
        self.workload = workload.cloned();
    }

    /// The last try went through the tunnel `route` (`None`: plaintext).
    pub fn tunnelled(&mut self, route: Option<Route>) {
        self.route = route;
    }

    /// Response flags and tries so far.
    pub fn progress(&mut self, flags: ResponseFlags, attempts: u32) {
        self.flags = flags;
        self.attempts = attempts;
    }

    pub fn add_flags(&mut self, flags: ResponseFlags) {
        self.flags |= flags;
    }

    /// The response head sent to the client (the upstream's or a local reply).
    pub fn answered<B>(&mut self, response: &http::Response<B>) {
        let number = |name: &HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        };
        self.answer = Some(Answer {
            status: response.status().as_u16(),
            // As Istio's label: a gRPC request's only (one lookup fewer for the rest).
            grpc_status: self
                .grpc
                .then(|| number(&GRPC_STATUS))
                .flatten()
                .map(|s| s as u32),
            bytes: number(&http::header::CONTENT_LENGTH).unwrap_or(0),
            version: response.version(),
        });
    }

    /// The destination service as telemetry names it.
    fn service(&self) -> Option<&Arc<ServiceIdentity>> {
        self.dialled
            .or_else(|| self.destination.as_ref()?.service.as_ref())
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        let telemetry = self.telemetry;
        let duration = self.started.elapsed();
        // No answer: the client went away before the response head was ready.
        let (status, grpc_status, response_bytes, version) = match &self.answer {
            Some(answer) => (
                answer.status,
                answer.grpc_status,
                answer.bytes,
                answer.version,
            ),
            None => {
                self.flags |= ResponseFlags::DC;
                (0, None, 0, self.version)
            }
        };
        let service = self.service();
        let service_host = service.map_or(UNKNOWN, |s| s.host.as_str());
        let peer = self.caller.peer(
            telemetry,
            self.endpoint,
            service,
            self.workload.as_ref(),
            self.route.as_ref(),
        );
        telemetry.metrics.record_request(
            &peer,
            &RequestOutcome {
                protocol: if self.grpc {
                    MetricsProtocol::Grpc
                } else {
                    MetricsProtocol::Http
                },
                status,
                grpc_status,
                flags: &self.flags,
                duration,
                request_bytes: self.request_bytes,
                response_bytes,
            },
        );
        let path = self.path.as_deref().unwrap_or("/");
        let cluster = self.destination.as_ref().map(|d| &*d.cluster);
        if let Some(spans) = telemetry.spans.as_ref().filter(|_| self.trace.sampled) {
            let end = SystemTime::now();
            spans.export(ProxySpan {
                context: self.trace.clone(),
                name: ProxySpan::envoy_name(service_host, self.port),
                service_name: Arc::clone(&self.caller.span_service),
                start: end.checked_sub(duration).unwrap_or(end),
                end,
                method: self.method.clone(),
                url: format!("http://{service_host}:{}{path}", self.port),
                protocol: version,
                status,
                upstream_cluster: cluster.unwrap_or_default().to_owned(),
                response_flags: self.flags.to_string(),
                peer: self.endpoint,
            });
        }
        // Built only when it logs: reading the request id as text costs ~190 instructions.
        if telemetry.access_log.is_enabled() {
            telemetry.access_log.http(&HttpRecord {
                source_pod: self.source_pod,
                source_workload: &self.caller.identity.workload,
                destination_service: service_host,
                destination_subset: self.destination.as_ref().and_then(|d| d.subset.as_deref()),
                endpoint: self.endpoint,
                method: self.method.as_str(),
                path_and_query: path,
                status,
                response_flags: &self.flags,
                attempts: self.attempts,
                duration,
                request_bytes: self.request_bytes,
                response_bytes,
                request_id: self.trace.request_id.as_str(),
                trace_id: self.trace.trace_id,
                span_id: self.trace.span_id,
                parent_span_id: self.trace.parent_span_id,
            });
        }
    }
}

/// One L4 connection through the proxy: created when it is accepted, emitted when dropped.
pub struct ConnectionRecord<'a> {
    telemetry: &'a Telemetry,
    source_pod: &'a str,
    client_port: u16,
    original_dst: SocketAddrV4,
    started: Instant,
    upstream: Option<SocketAddr>,
    /// Open from the upstream connect on; closing it counts the close.
    metrics: Option<TcpConnectionMetrics>,
    sent_bytes: u64,
    received_bytes: u64,
    error: Option<String>,
}

impl<'a> ConnectionRecord<'a> {
    pub fn start(
        telemetry: &'a Telemetry,
        source_pod: &'a str,
        client_port: u16,
        original_dst: SocketAddrV4,
    ) -> Self {
        ConnectionRecord {
            telemetry,
            source_pod,
            client_port,
            original_dst,
            started: Instant::now(),
            upstream: None,
            metrics: None,
            sent_bytes: 0,
            received_bytes: 0,
            error: None,
        }
    }

    /// The upstream connection is up (counts the connection as opened). `service` is `None`
    /// for a destination outside the mesh, `workload` when the endpoint's pod is unknown.
    /// `route`: the tunnel it went through, if any.
    pub fn connected(
        &mut self,
        endpoint: SocketAddr,
        caller: &Caller,
        service: Option<&Arc<ServiceIdentity>>,
        workload: Option<&Arc<WorkloadIdentity>>,
        route: Option<&Route>,
    ) {
        let peer = caller.peer(self.telemetry, Some(endpoint), service, workload, route);
        self.upstream = Some(endpoint);
        self.metrics = Some(self.telemetry.metrics.tcp_connection(&peer));
    }

    /// Bytes carried each way, once the connection has ended cleanly.
    pub fn transferred(&mut self, sent: u64, received: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.add_sent(sent);
            metrics.add_received(received);
        }
        (self.sent_bytes, self.received_bytes) = (sent, received);
    }

    /// Why the connection failed or ended with an error.
    pub fn failed(&mut self, error: String) {
        self.error = Some(error);
    }
}

impl Drop for ConnectionRecord<'_> {
    fn drop(&mut self) {
        // Counts the close (with no flags, as Istio's for a connection that was opened).
        drop(self.metrics.take());
        self.telemetry.access_log.tcp(&TcpRecord {
            source_pod: self.source_pod,
            client_port: self.client_port,
            original_dst: self.original_dst,
            upstream: self.upstream,
            sent_bytes: self.sent_bytes,
            received_bytes: self.received_bytes,
            duration: self.started.elapsed(),
            error: self.error.take(),
        });
    }
}

/// The same `Arc` (by address, not by value), or both none: whether something cached from
/// `a` still stands for `b`.
pub(crate) fn same_arc<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_keeps_the_labels_of_at_most_max_peers_endpoints() {
        let telemetry = Telemetry::for_tests();
        let identity = WorkloadIdentity::from_pod_labels("client-0", "shop", &Default::default());
        let caller = Caller::new(Arc::new(identity));
        let endpoint = |n: usize| SocketAddr::from(([10, 77, (n / 256) as u8, n as u8], 8080));
        let first = caller.peer(&telemetry, Some(endpoint(0)), None, None, None);
        let again = caller.peer(&telemetry, Some(endpoint(0)), None, None, None);
        assert!(Arc::ptr_eq(&first, &again), "interned once per endpoint");

        for n in 1..MAX_PEERS {
            caller.peer(&telemetry, Some(endpoint(n)), None, None, None);
        }
        let held = || caller.peers.lock().unwrap().len();
        assert_eq!(held(), MAX_PEERS);
        caller.peer(&telemetry, Some(endpoint(MAX_PEERS)), None, None, None);
        assert_eq!(held(), 1, "full: started again with the new endpoint alone");
    }
}
