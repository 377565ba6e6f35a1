//! The try loop: every request on a downstream connection is decided by the engine and carried
//! out here: buffer the body, route, fault, rewrites, mirror, then tries with per-try deadlines
//! and backoff until a response is forwarded or the engine gives up. Each try goes through the
//! pod's upstream pool under the destination cluster's limits. Its telemetry record is filled
//! along the way and emitted when this returns (or when the client goes away).

use std::{net::IpAddr, pin::pin, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    request::Parts,
    uri::{self, Authority, PathAndQuery, Scheme},
    HeaderMap, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use smallvec::SmallVec;
use tokio::sync::OwnedSemaphorePermit;

use super::{
    conn::{Entry, HttpConn},
    hop_by_hop::strip_hop_by_hop,
    limits::MAX_REPLAY_BODY,
    reply::{engine_reply, local_answer_reply, local_reply, protocol_error_reply, refusal_reply},
};
use crate::{
    engine::{
        registry::authority_host, Attempt, EngineError, Outcome, RequestInfo, RequestPlan, Verdict,
    },
    proxy::deadline::within,
    proxy::upstream::{
        BoxError, Progress, Protocol, ProxyBody, ReplyBody, ResponseBody, SendError, UpstreamPool,
        Waiting,
    },
    state::Snapshot,
    telemetry::{trace, RequestRecord, GRPC_STATUS},
};

/// Carries one request upstream and answers it; its record is emitted when this returns, or
/// dropped with the future if the client goes away first.
pub(super) async fn request(conn: &HttpConn, req: Request<Incoming>) -> Response<ReplyBody> {
    let snapshot = conn.store.snapshot();
    let (mut parts, body) = req.into_parts();
    let dialled = match &conn.entry {
        Entry::Service { target } => Some(&target.service),
        Entry::Ingress { .. } => None,
    };
    let mut record = RequestRecord::start(
        &conn.telemetry,
        &conn.pod.name,
        &conn.caller,
        &parts,
        conn.entry.port(),
        dialled,
    );
    let response = forward(conn, &snapshot, &mut parts, body, &mut record).await;
    record.answered(&response);
    response
}

async fn forward(
    conn: &HttpConn,
    snapshot: &Snapshot,
    parts: &mut Parts,
    body: Incoming,
    record: &mut RequestRecord<'_>,
) -> Response<ReplyBody> {
    let mut body = match buffer(conn, body).await {
        Ok(body) => body,
        Err(status) => return local_reply(status, "request body could not be read"),
    };
    record.set_request_bytes(body.len());
    strip_hop_by_hop(&mut parts.headers);
    // The request is in (Envoy's timeouts start here too): one clock read for routing,
    // the mirror and the first try.
    let mut now = clock();
    let replayable = matches!(body, RequestBody::Buffered(..));
    let mut plan = match route(conn, snapshot, parts, replayable, now) {
        Ok(plan) => plan,
        Err(error) => {
            record.progress(error.flags(), 0);
            return engine_reply(&error);
        }
    };
    // A redirect or direct response has no destination: answered before anything that needs
    // one (fault, mirror, tries); recorded like any answer, with the dialled service.
    if let Some(answer) = plan.local_answer() {
        record.progress(plan.flags(), 0);
        let mut response = local_answer_reply(answer);
        plan.rewrite_response(response.headers_mut());
        return response;
    }
    record.routed(plan.destination());
    if let Some(delay) = plan.delay() {
        tokio::time::sleep(delay).await;
        now = clock();
    }
    plan.rewrite_request(parts);
    trace::inject(record.trace(), &mut parts.headers);
    let protocol = match parts.version {
        Version::HTTP_2 => Protocol::Http2,
        _ => Protocol::Http1,
    };
    mirror(conn, &mut plan, parts, protocol, &body, now);
    let mut headers = TryHeaders::default();
    headers.keep(std::mem::take(&mut parts.headers));
    loop {
        let attempt = match plan.next_attempt(now) {
            Ok(attempt) => attempt,
            Err(error) => {
                record.progress(plan.flags(), plan.attempts());
                return engine_reply(&error);
            }
        };
        record.attempt(attempt.endpoint(), attempt.workload());
        record.tunnelled(conn.pod.dialer.route(attempt.endpoint()));
        let request = upstream_request(
            parts,
            headers.next(),
            plan.authority(&attempt),
            protocol,
            body.for_try(),
        );
        let tried = send(&conn.pod.upstream, &plan, &attempt, protocol, request).await;
        now = clock();
        // The client's body broke the try (malformed chunks, cut short): the client's fault,
        // answered 400 as Envoy does, and no word to outlier detection about the endpoint.
        if let (Err(_), Some(refusal)) = (&tried, conn.verdicts.body_refusal()) {
            return refusal_reply(refusal);
        }
        let protocol_error = matches!(tried, Err(Unanswered::Protocol));
        let (verdict, response) = match tried {
            Ok((outcome, response)) => (plan.report(attempt, outcome, now), Some(response)),
            Err(Unanswered::Failed(outcome)) => (plan.report(attempt, outcome, now), None),
            Err(Unanswered::Protocol) => (plan.report(attempt, Outcome::Reset, now), None),
            Err(Unanswered::Unsent(outcome)) => (plan.report_unsent(attempt, outcome, now), None),
            Err(Unanswered::Refused) => (plan.overflowed(attempt), None),
        };
        record.progress(plan.flags(), plan.attempts());
        match verdict {
            Verdict::Forward => {
                let Some(response) = response else {
                    return match protocol_error {
                        true => protocol_error_reply(&EngineError::UpstreamReset),
                        false => engine_reply(&EngineError::UpstreamReset),
                    };
                };
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                plan.rewrite_response(&mut head.headers);
                return Response::from_parts(head, ReplyBody::Upstream(body));
            }
            Verdict::RetryAt(at) => {
                drop(response);
                tokio::time::sleep_until(at.into()).await;
                now = clock();
            }
            Verdict::Fail(error) if protocol_error => return protocol_error_reply(&error),
            Verdict::Fail(error) => return engine_reply(&error),
        }
    }
}

/// The engine's decision: by the mesh's rules for a service port, by the rules bound to the
/// gateways on the listener's port at the ingress.
fn route(
    conn: &HttpConn,
    snapshot: &Snapshot,
    parts: &Parts,
    replayable: bool,
    now: Instant,
) -> Result<RequestPlan, EngineError> {
    let mut info = RequestInfo::from_parts(parts, conn.entry.port(), &conn.pod.namespace);
    info.replayable = replayable;
    match &conn.entry {
        Entry::Service { target } => {
            let authority = &target.authority;
            // The Gateway API's mesh routes apply to requests sent to their Service, whatever
            // their Host (GAMMA); Istio's rules select by Host.
            if let Some(decided) = snapshot.engine.route_claimed(&info, authority, now) {
                return decided;
            }
            info.authority = routing_authority(info.authority, authority);
            snapshot.engine.route(&info, now)
        }
        Entry::Ingress { .. } => snapshot.engine.route_ingress(&info, now),
    }
}

/// Sends a copy to the mirror destination, if the engine picked one; the answer is ignored.
/// A copy never waits for a connection, and a pod and the node have a bounded number in
/// flight (`Limits::max_mirrors_in_flight`): past any, it is dropped and counted
/// (`mesh_engine_events_total{event="mirror_dropped"}`).
fn mirror(
    conn: &HttpConn,
    plan: &mut RequestPlan,
    parts: &Parts,
    protocol: Protocol,
    body: &RequestBody,
    now: Instant,
) {
    let RequestBody::Buffered(bytes, _) = body else {
        return;
    };
    let Some(mirror) = plan.mirror(now) else {
        return;
    };
    let pod = &conn.pod;
    let Ok(in_flight_node) = Arc::clone(&conn.shared.mirrors).try_acquire_owned() else {
        mirror.dropped();
        return;
    };
    let Some(in_flight) = pod.upstream.mirror_slot() else {
        mirror.dropped();
        return;
    };
    let mut request = upstream_request(
        parts,
        parts.headers.clone(),
        mirror.authority(),
        protocol,
        ProxyBody::Full(bytes.clone()),
    );
    shadow_authority(&mut request);
    // As Envoy's shadow, the copy is bounded by the route's timeout.
    let deadline = plan
        .timeout()
        .map(|t| tokio::time::Instant::from_std(now) + t);
    let pod = Arc::clone(pod);
    tokio::spawn(async move {
        let _in_flight = (in_flight, in_flight_node);
        let copy = async {
            let mut progress = Progress::default();
            let sent = pod.upstream.send(
                mirror.pool(),
                mirror.endpoint(),
                protocol,
                request,
                Waiting::Refused,
                &mut progress,
            );
            match sent.await {
                // Read the answer through (keeping none of it), so its connection can serve
                // the next copy.
                Ok(response) => {
                    let mut body = response.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                }
                Err(SendError::Overflow) => mirror.dropped(),
                Err(_) => {}
            }
        };
        match deadline {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline, copy).await;
            }
            None => copy.await,
        }
    });
}

/// How the request body travels: buffered (replayable, holding its bytes' share of the
/// buffer budgets) or streamed once.
enum RequestBody {
    Buffered(
        Bytes,
        #[expect(dead_code, reason = "held for its drop")] Option<BufferPermit>,
    ),
    Streamed(Option<Incoming>),
}

/// A buffered body's bytes in the connection's and the node's budgets, given back on drop.
struct BufferPermit {
    _connection: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl RequestBody {
    fn for_try(&mut self) -> ProxyBody {
        match self {
            RequestBody::Buffered(bytes, _) => ProxyBody::Full(bytes.clone()),
            RequestBody::Streamed(body) => match body.take() {
                Some(body) => ProxyBody::boxed(body.map_err(BoxError::from)),
                None => ProxyBody::EMPTY,
            },
        }
    }

    fn len(&self) -> u64 {
        match self {
            RequestBody::Buffered(bytes, _) => bytes.len() as u64,
            RequestBody::Streamed(_) => 0,
        }
    }
}

/// How a try ended without a response head.
enum Unanswered {
    /// Connect failure, reset, or the deadline passed on the way.
    Failed(Outcome),
    /// The deadline passed while the request waited for a connection: the endpoint never
    /// saw it.
    Unsent(Outcome),
    /// The pool refused it (`UO`).
    Refused,
    /// The response was malformed (`UPE`): a reset to the engine, answered 502.
    Protocol,
}

/// Runs one try through the pod's pool until the try's deadline.
async fn send(
    upstream: &UpstreamPool,
    plan: &RequestPlan,
    attempt: &Attempt,
    protocol: Protocol,
    request: Request<ProxyBody>,
) -> Result<(Outcome, Response<ResponseBody>), Unanswered> {
    let mut progress = Progress::default();
    let result = {
        // Pinned where it is made: moved into the timeout, the large future was copied twice
        // a try (~500 instructions).
        let sent = pin!(upstream.send(
            plan.pool(),
            attempt.endpoint(),
            protocol,
            request,
            Waiting::Allowed,
            &mut progress,
        ));
        match attempt.deadline() {
            Some(deadline) => within(deadline.into(), sent).await,
            None => Some(sent.await),
        }
    };
    let result = match result {
        Some(result) => result,
        None if progress == Progress::Waiting => return Err(Unanswered::Unsent(Outcome::Timeout)),
        None => return Err(Unanswered::Failed(Outcome::Timeout)),
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
            Ok((outcome, response))
        }
        Err(SendError::Overflow) => Err(Unanswered::Refused),
        Err(SendError::ConnectFailure) => Err(Unanswered::Failed(Outcome::ConnectFailure)),
        Err(SendError::Reset) => Err(Unanswered::Failed(Outcome::Reset)),
        Err(SendError::Protocol) => Err(Unanswered::Protocol),
    }
}

/// Now, by tokio's clock: the same as `Instant::now()` in the agent, and the paused clock in
/// tests, so the engine's deadlines and tokio's timers agree.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Buffers a small body so it can be replayed, if the connection's and the node's buffer
/// budgets have room for it; a large or unbounded one, or one over budget, is streamed once
/// (not retried, not mirrored: what Envoy's router does when its retry buffer overflows). Over
/// budget is counted (`mesh_proxy_limit_hits_total{limit="body_buffer_connection"}` or
/// `"body_buffer_global"`).
async fn buffer(conn: &HttpConn, body: Incoming) -> Result<RequestBody, StatusCode> {
    use hyper::body::Body;
    if body.is_end_stream() {
        return Ok(RequestBody::Buffered(Bytes::new(), None));
    }
    let len = match body.size_hint().upper() {
        Some(len) if len <= MAX_REPLAY_BODY => len,
        _ => return Ok(RequestBody::Streamed(Some(body))),
    };
    let Some(permit) = reserve(conn, len) else {
        return Ok(RequestBody::Streamed(Some(body)));
    };
    Limited::new(body, MAX_REPLAY_BODY as usize)
        .collect()
        .await
        .map(|collected| RequestBody::Buffered(collected.to_bytes(), Some(permit)))
        .map_err(|_| StatusCode::BAD_REQUEST)
}

/// `len` bytes of the connection's and the node's buffer budgets, or `None` (counted).
fn reserve(conn: &HttpConn, len: u64) -> Option<BufferPermit> {
    // At most MAX_REPLAY_BODY, so it fits.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let Ok(connection) = Arc::clone(&conn.body_bytes).try_acquire_many_owned(len) else {
        conn.telemetry.metrics.limit_hit("body_buffer_connection");
        return None;
    };
    let Ok(global) = Arc::clone(&conn.shared.body_bytes).try_acquire_many_owned(len) else {
        conn.telemetry.metrics.limit_hit("body_buffer_global");
        return None;
    };
    Some(BufferPermit {
        _connection: connection,
        _global: global,
    })
}

/// The authority the engine routes on: the client's, unless it named an IP (then the service).
fn routing_authority<'a>(authority: &'a str, service_authority: &'a str) -> &'a str {
    let host = authority_host(authority);
    if host.is_empty() || is_ip_literal(host) {
        service_authority
    } else {
        authority
    }
}

/// An IPv4 literal is digits and dots, an IPv6 one has colons: a name (the usual case) is told
/// apart without running both address parsers (~200 instructions a request).
fn is_ip_literal(host: &str) -> bool {
    let may_be = host.contains(':') || host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    may_be && host.parse::<IpAddr>().is_ok()
}

/// The authority the client addressed: HTTP/2's `:authority` (in the URI), else `Host`.
fn client_authority(uri: &Uri, headers: &HeaderMap) -> Option<Authority> {
    if let Some(authority) = uri.authority() {
        return Some(authority.clone());
    }
    let host = headers.get(header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// Envoy marks a mirrored request by suffixing its host, before the port
/// (`service-g:8080` → `service-g-shadow:8080`): in `Host` for HTTP/1.1, in `:authority` for
/// HTTP/2.
fn shadow_authority(request: &mut Request<ProxyBody>) {
    if let Some(host) = request.headers().get(header::HOST) {
        let shadow = host
            .to_str()
            .ok()
            .and_then(|host| HeaderValue::from_str(&with_shadow_suffix(host)).ok());
        if let Some(shadow) = shadow {
            request.headers_mut().insert(header::HOST, shadow);
        }
        return;
    }
    let Some(authority) = request.uri().authority() else {
        return;
    };
    let Ok(shadow) = Authority::try_from(with_shadow_suffix(authority.as_str())) else {
        return;
    };
    let mut uri = uri::Parts::from(request.uri().clone());
    uri.authority = Some(shadow);
    if let Ok(uri) = Uri::from_parts(uri) {
        *request.uri_mut() = uri;
    }
}

fn with_shadow_suffix(authority: &str) -> String {
    // A port follows the last `:` unless that colon is inside an IPv6 literal.
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

/// The request's headers for each try. The first try sends the request's own map and a copy
/// stays for retries as a list, kept in the request's future up to [`KEPT_INLINE`] headers: no
/// allocation, where a clone of the map for every try took two (its entries and its index). A
/// retry, the rare case, builds a map from the list again.
#[derive(Default)]
struct TryHeaders {
    first: Option<HeaderMap>,
    copy: SmallVec<[(HeaderName, HeaderValue); KEPT_INLINE]>,
}

/// Headers a retry's copy holds without an allocation: a usual request's and the trace
/// headers the mesh adds (six).
const KEPT_INLINE: usize = 16;

impl TryHeaders {
    /// Keeps `headers` for the first try and copies them for the others, in place: the list is
    /// large, and built elsewhere it was moved here whole (~150 instructions a request).
    fn keep(&mut self, headers: HeaderMap) {
        let copy = headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()));
        self.copy.extend(copy);
        self.first = Some(headers);
    }

    /// The headers the next try sends, in the order the client sent them.
    fn next(&mut self) -> HeaderMap {
        self.first.take().unwrap_or_else(|| {
            let mut headers = HeaderMap::with_capacity(self.copy.len());
            for (name, value) in &self.copy {
                headers.append(name.clone(), value.clone());
            }
            headers
        })
    }
}

/// The request for one try: the head in `parts` with `headers`, sent to the chosen endpoint.
/// HTTP/1.1 takes the path alone (origin form), with the client's `Host`; HTTP/2 the absolute
/// URI with the client's authority (after any rewrite), or the endpoint's if the client sent
/// none.
fn upstream_request(
    parts: &Parts,
    headers: HeaderMap,
    endpoint: &Authority,
    protocol: Protocol,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = match protocol {
        Protocol::Http1 => Uri::from(path),
        Protocol::Http2 => {
            let mut uri = uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority =
                Some(client_authority(&parts.uri, &headers).unwrap_or_else(|| endpoint.clone()));
            uri.path_and_query = Some(path);
            Uri::from_parts(uri).unwrap_or_default()
        }
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = match protocol {
        Protocol::Http2 => Version::HTTP_2,
        Protocol::Http1 => Version::HTTP_11,
    };
    *request.headers_mut() = headers;
    if protocol == Protocol::Http2 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The request a try sends to an endpoint of 10.77.0.9:8080.
    fn try_of(parts: &Parts, protocol: Protocol) -> Request<ProxyBody> {
        let endpoint = Authority::from_static("10.77.0.9:8080");
        upstream_request(
            parts,
            parts.headers.clone(),
            &endpoint,
            protocol,
            ProxyBody::EMPTY,
        )
    }

    #[test]
    fn a_client_that_named_an_ip_is_routed_by_the_service() {
        let service = "service-c.default.svc.cluster.local:8080";
        for by_ip in [
            "10.96.0.12:8080",
            "10.96.0.12",
            "[fd00::12]:8080",
            "[fd00::12]",
            "[::ffff:10.96.0.12]:8080",
            ":80",
        ] {
            assert_eq!(routing_authority(by_ip, service), service, "{by_ip}");
        }
        for by_name in [
            "service-c:8080",
            "service-c",
            "api.example.org",
            "10.96.0:8080",
        ] {
            assert_eq!(routing_authority(by_name, service), by_name);
        }
    }

    #[test]
    fn the_shadow_suffix_goes_on_the_host_before_any_port() {
        assert_eq!(
            with_shadow_suffix("service-g:8080"),
            "service-g-shadow:8080"
        );
        assert_eq!(with_shadow_suffix("service-g"), "service-g-shadow");
        assert_eq!(with_shadow_suffix("10.0.0.1:80"), "10.0.0.1-shadow:80");
        assert_eq!(with_shadow_suffix("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(with_shadow_suffix("[::1]"), "[::1]-shadow");
    }

    #[test]
    fn http2_tries_carry_the_clients_authority_not_the_endpoints() {
        let (parts, ()) = Request::get("http://service-g:8080/orders?x=1")
            .version(Version::HTTP_2)
            .body(())
            .unwrap()
            .into_parts();
        let request = try_of(&parts, Protocol::Http2);
        assert_eq!(request.uri(), "http://service-g:8080/orders?x=1");
        let mut mirrored = try_of(&parts, Protocol::Http2);
        shadow_authority(&mut mirrored);
        assert_eq!(mirrored.uri(), "http://service-g-shadow:8080/orders?x=1");

        // No authority at all: the endpoint's keeps the HTTP/2 request well formed.
        let (parts, ()) = Request::get("/orders").body(()).unwrap().into_parts();
        let request = try_of(&parts, Protocol::Http2);
        assert_eq!(request.uri(), "http://10.77.0.9:8080/orders");
    }

    #[test]
    fn a_retry_sends_the_headers_the_first_try_sent_in_the_same_order() {
        let mut headers = HeaderMap::new();
        headers.append(header::HOST, HeaderValue::from_static("service-g:8080"));
        headers.append("x-custom", HeaderValue::from_static("1"));
        headers.append(header::ACCEPT, HeaderValue::from_static("text/html"));
        headers.append("x-custom", HeaderValue::from_static("2"));
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        let order = |headers: &HeaderMap| {
            headers
                .iter()
                .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        let sent = order(&headers);
        let mut tries = TryHeaders::default();
        tries.keep(headers);
        assert_eq!(order(&tries.next()), sent);
        assert_eq!(order(&tries.next()), sent);
        assert_eq!(order(&tries.next()), sent);
    }

    #[test]
    fn http1_mirrors_suffix_the_host_header() {
        let (parts, ()) = Request::get("/orders")
            .header(header::HOST, "service-g:8080")
            .body(())
            .unwrap()
            .into_parts();
        let mut mirrored = try_of(&parts, Protocol::Http1);
        shadow_authority(&mut mirrored);
        assert_eq!(mirrored.headers()[header::HOST], "service-g-shadow:8080");
        assert_eq!(mirrored.uri(), "/orders");
    }
}
