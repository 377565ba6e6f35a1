//! The try loop: every request on a downstream connection is decided by the engine and carried
//! out here: buffer the body, route, fault, rewrites, mirror, then tries with per-try deadlines
//! and backoff until a response is forwarded or the engine gives up. Its telemetry record is
//! filled along the way and emitted when this returns (or when the client goes away).

use std::{net::IpAddr, time::Instant};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    request::Parts,
    uri::{self, Authority, PathAndQuery, Scheme},
    Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::debug;

use super::{
    conn::{Entry, HttpConn},
    hop_by_hop::strip_hop_by_hop,
    limits::MAX_REPLAY_BODY,
    reply::{empty, engine_reply, full, local_reply},
};
use crate::{
    engine::{EngineError, Outcome, RequestInfo, RequestPlan, Verdict},
    proxy::upstream::{BoxError, HttpClient, ProxyBody},
    state::Snapshot,
    telemetry::{trace, RequestRecord, GRPC_STATUS},
};

/// Carries one request upstream and answers it; its record is emitted when this returns, or
/// dropped with the future if the client goes away first.
pub(super) async fn request(conn: &HttpConn, req: Request<Incoming>) -> Response<ProxyBody> {
    let snapshot = conn.store.snapshot();
    let (mut parts, body) = req.into_parts();
    let dialled = match &conn.entry {
        Entry::Service { target, .. } => Some(&target.service),
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
) -> Response<ProxyBody> {
    let mut body = match buffer(body).await {
        Ok(body) => body,
        Err(status) => return local_reply(status, "request body could not be read"),
    };
    record.set_request_bytes(body.len());
    strip_hop_by_hop(&mut parts.headers);
    // The request is in (Envoy's timeouts start here too): one clock read for routing,
    // the mirror and the first try.
    let mut now = Instant::now();
    let replayable = matches!(body, RequestBody::Buffered(_));
    let mut plan = match route(conn, snapshot, parts, replayable, now) {
        Ok(plan) => plan,
        Err(error) => {
            record.progress(error.flags(), 0);
            return engine_reply(&error);
        }
    };
    record.routed(plan.destination());
    if let Some(delay) = plan.delay() {
        tokio::time::sleep(delay).await;
        now = Instant::now();
    }
    plan.rewrite_request(parts);
    trace::inject(record.trace(), &mut parts.headers);
    mirror(conn, &mut plan, parts, &body, now);
    let client = match parts.version {
        Version::HTTP_2 => &conn.pod.clients.http2,
        _ => &conn.pod.clients.http1,
    };
    loop {
        let attempt = match plan.next_attempt(now) {
            Ok(attempt) => attempt,
            Err(error) => {
                record.progress(plan.flags(), plan.attempts());
                return engine_reply(&error);
            }
        };
        record.attempt(attempt.endpoint(), attempt.workload());
        let request = upstream_request(parts, plan.authority(&attempt), body.for_try());
        let (outcome, response) = send(client, request, attempt.deadline()).await;
        now = Instant::now();
        let verdict = plan.report(attempt, outcome, now);
        record.progress(plan.flags(), plan.attempts());
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
        Entry::Service { authority, .. } => {
            info.authority = routing_authority(info.authority, authority);
            snapshot.engine.route(&info, now)
        }
        Entry::Ingress { .. } => snapshot.engine.route_ingress(&info, now),
    }
}

/// Sends a copy to the mirror destination, if the engine picked one; the answer is ignored.
fn mirror(
    conn: &HttpConn,
    plan: &mut RequestPlan,
    parts: &Parts,
    body: &RequestBody,
    now: Instant,
) {
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
    let client = conn.pod.clients.http1.clone();
    tokio::spawn(async move {
        let _ = client.request(request).await;
    });
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
