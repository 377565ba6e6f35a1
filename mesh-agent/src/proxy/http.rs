//! L7: every request on a redirected HTTP connection (HTTP/1.1 keep-alive, or HTTP/2 with prior
//! knowledge, gRPC included) is decided by the engine and carried out here: fault, rewrites,
//! tries with per-try deadlines and backoff, mirroring, and Envoy-style local replies.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    request::Parts,
    uri::{self, Authority, PathAndQuery, Scheme},
    Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    smuggling::{Guarded, Verdicts},
    upstream::{BoxError, HttpClient, ProxyBody},
    PodContext,
};
use crate::{
    config::model::Gateway,
    discovery::ServiceTarget,
    engine::{EngineError, Outcome, RequestInfo, RequestPlan, ResponseFlags, Verdict},
    identity::{ServiceIdentity, WorkloadIdentity},
    state::{Snapshot, Store},
    telemetry::{
        metrics::{PeerLabels, Protocol as MetricsProtocol, RequestOutcome},
        otlp::ProxySpan,
        trace::{self, SpanContext},
        HttpRecord, Telemetry,
    },
};

/// Largest request head accepted; larger gets 431 (Envoy's default is 60 KiB too).
pub const MAX_HEADER_BYTES: usize = 60 * 1024;
/// Read from responses for metrics and retries; a constant, so a lookup does not parse the name.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// Bodies up to this size are buffered so the request can be retried and mirrored.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// One downstream HTTP connection: a pod's redirected connection to a service port, or a
/// connection to the ingress gateway.
pub struct HttpConn {
    pub pod: Arc<PodContext>,
    pub entry: Entry,
    pub store: Arc<Store>,
    pub telemetry: Arc<Telemetry>,
    /// The calling pod as telemetry names it.
    source: WorkloadIdentity,
    /// `workload.namespace`, the service name spans are grouped under (as Istio's).
    span_service: Arc<str>,
    /// Interned metric labels per upstream endpoint, for the snapshot version they were made
    /// on: recording a request then costs no hashing of label strings and no shared lock.
    peers: Mutex<(u64, HashMap<SocketAddr, Arc<PeerLabels>>)>,
    verdicts: Verdicts,
}

/// How the request entered the mesh.
pub enum Entry {
    /// A pod dialled this service port (its VIP).
    Service {
        target: ServiceTarget,
        /// `fqdn:port`, the authority used for routing when the client sent an IP as `Host`.
        authority: String,
    },
    /// The ingress gateway's listener on this port: routed by `Gateway`-bound rules.
    Ingress { port: u16 },
}

impl Entry {
    fn port(&self) -> u16 {
        match self {
            Entry::Service { target, .. } => target.port,
            Entry::Ingress { port } => *port,
        }
    }
}

/// Serves the connection until the client closes it, or until `draining`: then requests in
/// flight finish and the connection closes (HTTP/2 sends GOAWAY, HTTP/1 closes when idle).
impl HttpConn {
    pub fn new(
        pod: Arc<PodContext>,
        entry: Entry,
        store: Arc<Store>,
        telemetry: Arc<Telemetry>,
        source: WorkloadIdentity,
    ) -> Self {
        HttpConn {
            span_service: Arc::from(format!("{}.{}", source.workload, source.namespace)),
            pod,
            entry,
            store,
            telemetry,
            source,
            peers: Mutex::default(),
            verdicts: Verdicts::default(),
        }
    }
}

pub async fn serve(stream: TcpStream, conn: Arc<HttpConn>, draining: &CancellationToken) {
    let io = TokioIo::new(Guarded::new(stream, conn.verdicts.clone()));
    let service = service_fn(move |req| {
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%error, "downstream HTTP connection ended with an error");
    }
}

/// How the request body travels: buffered (replayable) or streamed once.
enum RequestBody {
    Buffered(Bytes),
    Streamed(Option<Incoming>),
}

impl RequestBody {
    fn for_try(&mut self) -> ProxyBody {
        match self {
            RequestBody::Buffered(bytes) if bytes.is_empty() => empty(),
            RequestBody::Buffered(bytes) => full(bytes.clone()),
            RequestBody::Streamed(body) => match body.take() {
                Some(body) => body.map_err(BoxError::from).boxed(),
                None => empty(),
            },
        }
    }

    fn len(&self) -> u64 {
        match self {
            RequestBody::Buffered(bytes) => bytes.len() as u64,
            RequestBody::Streamed(_) => 0,
        }
    }
}

/// What happened to a request, for metrics, the span and the access log.
struct Report {
    flags: ResponseFlags,
    attempts: u32,
    endpoint: Option<SocketAddr>,
    /// `None` until routed.
    cluster: Option<Arc<str>>,
    request_bytes: u64,
}

impl HttpConn {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        if let Some(ambiguity) = self.verdicts.next() {
            // Read what the client sent (bounded) so closing does not reset the connection
            // before it has read the answer.
            let _ = Limited::new(req.into_body(), MAX_REPLAY_BODY as usize)
                .collect()
                .await;
            let mut response = local_reply(StatusCode::BAD_REQUEST, ambiguity.reason());
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        let started = Instant::now();
        let snapshot = self.store.snapshot();
        let (mut parts, body) = req.into_parts();
        let trace = trace::continue_or_start(
            &parts.headers,
            self.telemetry.trace_sample_ratio,
            &mut fastrand::Rng::new(),
        );
        let method = parts.method.clone();
        // Only the access log and spans show the path: copy it only for them.
        let path =
            (self.telemetry.access_log.is_enabled() || self.telemetry.spans.is_some()).then(|| {
                parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned()
            });
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut report = Report {
            flags: ResponseFlags::NONE,
            attempts: 0,
            endpoint: None,
            cluster: None,
            request_bytes: 0,
        };
        let response = self
            .forward(&snapshot, &mut parts, body, &trace, &mut report)
            .await;
        self.record(
            &snapshot,
            &response,
            &report,
            &trace,
            started,
            (&method, path.as_deref().unwrap_or("/"), grpc),
        );
        response
    }

    async fn forward(
        &self,
        snapshot: &Snapshot,
        parts: &mut Parts,
        body: Incoming,
        trace: &SpanContext,
        report: &mut Report,
    ) -> Response<ProxyBody> {
        let mut body = match buffer(body).await {
            Ok(body) => body,
            Err(status) => return local_reply(status, "request body could not be read"),
        };
        report.request_bytes = body.len();
        strip_hop_by_hop(&mut parts.headers);
        // The request is in (Envoy's timeouts start here too): one clock read for routing,
        // the mirror and the first try.
        let mut now = Instant::now();
        let replayable = matches!(body, RequestBody::Buffered(_));
        let mut plan = match self.route(snapshot, parts, replayable, now) {
            Ok(plan) => plan,
            Err(error) => {
                report.flags = error.flags();
                return engine_reply(&error);
            }
        };
        report.cluster = Some(plan.cluster_name_shared());
        if let Some(delay) = plan.delay() {
            tokio::time::sleep(delay).await;
            now = Instant::now();
        }
        plan.rewrite_request(parts);
        trace::inject(trace, &mut parts.headers);
        self.mirror(&mut plan, parts, &body, now);
        let client = match parts.version {
            Version::HTTP_2 => &self.pod.clients.http2,
            _ => &self.pod.clients.http1,
        };
        loop {
            let attempt = match plan.next_attempt(now) {
                Ok(attempt) => attempt,
                Err(error) => {
                    (report.flags, report.attempts) = (plan.flags(), plan.attempts());
                    return engine_reply(&error);
                }
            };
            report.endpoint = Some(attempt.endpoint());
            let request = upstream_request(parts, plan.authority(&attempt), body.for_try());
            let (outcome, response) = send(client, request, attempt.deadline()).await;
            now = Instant::now();
            let verdict = plan.report(attempt, outcome, now);
            (report.flags, report.attempts) = (plan.flags(), plan.attempts());
            match verdict {
                Verdict::Forward => {
                    let Some(response) = response else {
                        return engine_reply(&EngineError::UpstreamReset);
                    };
                    let (mut head, body) = response.into_parts();
                    strip_hop_by_hop(&mut head.headers);
                    plan.rewrite_response(&mut head.headers);
                    return Response::from_parts(head, body.map_err(BoxError::from).boxed());
                }
                Verdict::RetryAt(at) => {
                    drop(response);
                    tokio::time::sleep_until(at.into()).await;
                    now = Instant::now();
                }
                Verdict::Fail(error) => return engine_reply(&error),
            }
        }
    }

    fn peer_labels(
        &self,
        snapshot: &Snapshot,
        endpoint: Option<SocketAddr>,
        service: Option<&ServiceIdentity>,
        destination: Option<&WorkloadIdentity>,
    ) -> Arc<PeerLabels> {
        let metrics = &self.telemetry.metrics;
        let Some(endpoint) = endpoint else {
            return metrics.peer_labels(&self.source, service, destination);
        };
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.0 != snapshot.version {
            *peers = (snapshot.version, HashMap::new());
        }
        Arc::clone(
            peers
                .1
                .entry(endpoint)
                .or_insert_with(|| metrics.peer_labels(&self.source, service, destination)),
        )
    }

    /// The engine's decision. At the ingress, the gateways with a server on the listener's port
    /// are tried in order (all gateways if none names that port, so a demo listener on another
    /// port than the Gateway's still works).
    fn route(
        &self,
        snapshot: &Snapshot,
        parts: &Parts,
        replayable: bool,
        now: Instant,
    ) -> Result<RequestPlan, EngineError> {
        let request = |gateway: Option<&str>| {
            let mut info = RequestInfo::from_parts(parts, self.entry.port(), &self.pod.namespace);
            info.replayable = replayable;
            info.gateway = gateway;
            if let Entry::Service { authority, .. } = &self.entry {
                info.authority = routing_authority(info.authority, authority);
            }
            snapshot.engine.route(&info, now)
        };
        let Entry::Ingress { port } = self.entry else {
            return request(None);
        };
        let gateways: Vec<&Gateway> = crate::config::of_kind(&snapshot.objects, "Gateway")
            .filter_map(|o| match &o.object {
                crate::config::Object::Gateway(gateway) => Some(&*gateway.rule),
                _ => None,
            })
            .collect();
        let on_port = |g: &&Gateway| g.servers.iter().any(|s| s.port == port);
        let any_on_port = gateways.iter().any(on_port);
        for gateway in gateways.iter().filter(|g| !any_on_port || on_port(g)) {
            let name = format!("{}/{}", gateway.id.namespace, gateway.id.name);
            match request(Some(&name)) {
                Err(EngineError::NoRoute) => continue,
                decided => return decided,
            }
        }
        Err(EngineError::NoRoute)
    }

    /// The destination service as telemetry names it: the one dialled, or at the ingress the
    /// one routed to.
    fn destination<'s>(
        &'s self,
        snapshot: &'s Snapshot,
        cluster: &str,
    ) -> Option<&'s ServiceIdentity> {
        match &self.entry {
            Entry::Service { target, .. } => Some(&target.service),
            // Envoy's cluster name: `outbound|port|subset|host`.
            Entry::Ingress { .. } => cluster
                .rsplit('|')
                .next()
                .and_then(|host| snapshot.discovered.service_named(host)),
        }
    }

    /// Metrics, span and access log for one finished request (response headers sent).
    fn record(
        &self,
        snapshot: &Snapshot,
        response: &Response<ProxyBody>,
        report: &Report,
        trace: &SpanContext,
        started: Instant,
        (method, path, grpc): (&Method, &str, bool),
    ) {
        let telemetry = &self.telemetry;
        let duration = started.elapsed();
        let status = response.status().as_u16();
        let destination = report
            .endpoint
            .and_then(|e| snapshot.discovered.workload_at(e.ip()))
            .map(|w| &w.identity);
        let service = self.destination(snapshot, report.cluster.as_deref().unwrap_or_default());
        let service_host = service.map_or("unknown", |s| s.host.as_str());
        let peer = self.peer_labels(snapshot, report.endpoint, service, destination);
        let header_number = |name: &HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        };
        let response_bytes = header_number(&header::CONTENT_LENGTH).unwrap_or(0);
        telemetry.metrics.record_request(
            &peer,
            &RequestOutcome {
                protocol: if grpc {
                    MetricsProtocol::Grpc
                } else {
                    MetricsProtocol::Http
                },
                status,
                grpc_status: header_number(&GRPC_STATUS).map(|s| s as u32),
                flags: &report.flags,
                duration,
                request_bytes: report.request_bytes,
                response_bytes,
            },
        );
        if let Some(spans) = &telemetry.spans {
            let end = SystemTime::now();
            spans.export(ProxySpan {
                context: trace.clone(),
                name: ProxySpan::envoy_name(service_host, self.entry.port()),
                service_name: Arc::clone(&self.span_service),
                start: end.checked_sub(duration).unwrap_or(end),
                end,
                method: method.clone(),
                url: format!("http://{service_host}:{}{path}", self.entry.port()),
                protocol: response.version(),
                status,
                upstream_cluster: report.cluster.as_deref().unwrap_or_default().to_owned(),
                response_flags: report.flags.to_string(),
                peer: report.endpoint,
            });
        }
        telemetry.access_log.http(&HttpRecord {
            source_pod: &self.pod.name,
            source_workload: &self.source.workload,
            destination_service: service_host,
            destination_subset: None,
            endpoint: report.endpoint,
            method: method.as_str(),
            path_and_query: path,
            status,
            response_flags: &report.flags,
            attempts: report.attempts,
            duration,
            request_bytes: report.request_bytes,
            response_bytes,
            request_id: &trace.request_id,
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent_span_id: trace.parent_span_id,
        });
    }

    /// Sends a copy to the mirror destination, if the engine picked one; the answer is ignored.
    fn mirror(&self, plan: &mut RequestPlan, parts: &Parts, body: &RequestBody, now: Instant) {
        let RequestBody::Buffered(bytes) = body else {
            return;
        };
        let Some(endpoint) = plan.mirror_endpoint(now) else {
            return;
        };
        let Ok(authority) = Authority::try_from(endpoint.to_string()) else {
            return;
        };
        let mut request = upstream_request(parts, &authority, full(bytes.clone()));
        // Envoy marks shadowed requests by suffixing the host.
        if let Some(host) = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            if let Ok(shadow) = HeaderValue::from_str(&format!("{host}-shadow")) {
                request.headers_mut().insert(header::HOST, shadow);
            }
        }
        let client = self.pod.clients.http1.clone();
        tokio::spawn(async move {
            let _ = client.request(request).await;
        });
    }
}

/// Runs one try until its deadline.
async fn send(
    client: &HttpClient,
    request: Request<ProxyBody>,
    deadline: Option<Instant>,
) -> (Outcome, Option<Response<Incoming>>) {
    let sent = client.request(request);
    let result = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline.into(), sent).await {
            Ok(result) => result,
            Err(_) => return (Outcome::Timeout, None),
        },
        None => sent.await,
    };
    match result {
        Ok(response) => {
            let grpc_status = response
                .headers()
                .get(&GRPC_STATUS)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let outcome = Outcome::Response {
                status: response.status().as_u16(),
                grpc_status,
            };
            (outcome, Some(response))
        }
        Err(error) if error.is_connect() => (Outcome::ConnectFailure, None),
        Err(error) => {
            debug!(%error, "upstream reset before the response");
            (Outcome::Reset, None)
        }
    }
}

/// Buffers a small body so it can be replayed; a large or unbounded one is streamed once.
async fn buffer(body: Incoming) -> Result<RequestBody, StatusCode> {
    use hyper::body::Body;
    if body.is_end_stream() {
        return Ok(RequestBody::Buffered(Bytes::new()));
    }
    match body.size_hint().upper() {
        Some(len) if len <= MAX_REPLAY_BODY => Limited::new(body, MAX_REPLAY_BODY as usize)
            .collect()
            .await
            .map(|collected| RequestBody::Buffered(collected.to_bytes()))
            .map_err(|_| StatusCode::BAD_REQUEST),
        _ => Ok(RequestBody::Streamed(Some(body))),
    }
}

/// The authority the engine routes on: the client's, unless it named an IP (then the service).
fn routing_authority<'a>(authority: &'a str, service_authority: &'a str) -> &'a str {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() || host.parse::<IpAddr>().is_ok() {
        service_authority
    } else {
        authority
    }
}

/// The request for one try: same head, sent to the chosen endpoint.
fn upstream_request(parts: &Parts, endpoint: &Authority, body: ProxyBody) -> Request<ProxyBody> {
    let mut uri = uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(endpoint.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(uri).unwrap_or_default();
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = match parts.version {
        Version::HTTP_2 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    *request.headers_mut() = parts.headers.clone();
    if parts.version == Version::HTTP_2 {
        // HTTP/2 carries the authority as a pseudo-header; an HTTP/1 upstream needs Host.
        request.headers_mut().remove(header::HOST);
    } else if !request.headers().contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                request.headers_mut().insert(header::HOST, host);
            }
        }
    }
    request
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection` and the fixed set.
/// `te: trailers` survives, since gRPC over HTTP/2 requires it end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names, instead of hashing each of the nine.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// Whether `strip_hop_by_hop` has anything to look at (names listed in `Connection` are only
/// hop-by-hop when `Connection` is there).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

fn engine_reply(error: &EngineError) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = local_reply(status, reply_text(error));
    if let Ok(flags) = HeaderValue::from_str(&error.flags().to_string()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-mesh-response-flags"), flags);
    }
    response
}

/// Envoy's wording, so users' existing runbooks and searches still match.
fn reply_text(error: &EngineError) -> &'static str {
    match error {
        EngineError::NoRoute => "no route",
        EngineError::NoHealthyUpstream => "no healthy upstream",
        EngineError::Overflow => {
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        }
        EngineError::PerTryTimeout | EngineError::RequestTimeout => "upstream request timeout",
        EngineError::FaultAbort { .. } => "fault filter abort",
        _ => "upstream connect error or disconnect/reset before headers",
    }
}

pub fn local_reply(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_others_kept() {
        let mut map = headers(&[
            ("host", "service-c"),
            ("connection", "x-private, keep-alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut map);
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "x-kept"]);

        for alone in [
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "trailer",
        ] {
            let mut map = headers(&[("host", "a"), (alone, "x")]);
            strip_hop_by_hop(&mut map);
            assert_eq!(map.len(), 1, "{alone} must go");
        }
        let mut grpc = headers(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut grpc);
        assert_eq!(grpc.len(), 2, "te: trailers stays");
        let mut plain = headers(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
    }
}
