//! HTTP at the destination: served on the arriving stream with hyper, each request judged by
//! the pod's policies and then answered `403 RBAC: access denied` (Envoy's words) or forwarded
//! to the app on one connection of its own, HTTP/1 or HTTP/2 as the client spoke. When the
//! policies judged the connection before its bytes, the app's connection was dialled already;
//! otherwise it is opened for the first request allowed, so a client denied everything never
//! reaches the app. It is opened again when the app has closed it.
//!
//! What the app receives: the request as sent, except its path normalized as it was judged
//! ([`path::normalize`]), `x-forwarded-client-cert` set by this agent from the tunnel's
//! identities (any the client sent is dropped, as Envoy's `SANITIZE_SET` does) and hop-by-hop
//! headers left on their hop, both ways, except an HTTP/1 upgrade (WebSocket): the client's
//! `Upgrade` goes to the app, and once the app switches, the two connections' bytes are carried
//! as they come.
//!
//! Bounded as the downstream side is: a head must come whole within [`HEADER_TIMEOUT`]; an
//! HTTP/2 connection with no request in flight for the agent's `http_idle_timeout` is sent
//! GOAWAY and closed, and it is pinged every `h2_keepalive_interval` and closed when the answer
//! is late.
//!
//! Each request is reported by the destination (`istio_requests_total{reporter="destination"}`
//! and its histograms), once its answer has been sent whole or given up: 403s included.

use std::{
    borrow::Cow,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE},
    uri::PathAndQuery,
    HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn,
    service::service_fn,
    upgrade::OnUpgrade,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex};

use super::{audit, App, Arrival, PodPolicies, Prefixed, Resettable};
use crate::{
    authorization::{path, HttpAttributes},
    proxy::{
        detect::Detected,
        http::{
            activity::{Activity, InFlight, IDLE_CLOSE_GRACE},
            limits::{
                H2_CONNECTION_WINDOW, H2_MAX_CONCURRENT_STREAMS, H2_MAX_PENDING_RESET_STREAMS,
                H2_MAX_SEND_BUFFER, H2_STREAM_WINDOW, MAX_HEADER_BYTES,
            },
            strip_hop_by_hop,
        },
        upstream::ReplyBody,
    },
    telemetry::metrics::{Metrics, NoFlags, Protocol, RequestOutcome},
};

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// How long a request head may take to arrive whole, from the first byte of the connection or
/// the end of the previous request: Envoy's `request_headers_timeout` as Istio's gateways set
/// it. The client is a source agent, which writes whole heads; only a broken or hostile one is
/// slower.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `stream` until its client is done.
pub async fn serve<S: Resettable>(
    stream: Prefixed<S>,
    protocol: Detected,
    policies: Arc<PodPolicies>,
    arrival: Arc<Arrival>,
    app: App,
    dialled: Option<TcpStream>,
    metrics: &Arc<Metrics>,
) {
    let limits = app.limits;
    // Only HTTP/2 is watched for idleness: hyper's header timer closes an idle HTTP/1 one.
    let activity = (protocol == Detected::Http2).then(|| {
        let activity = Arc::new(Activity::new());
        // Detected by its preface: the idle clock runs from here.
        activity.preface_read();
        activity
    });
    let delivery = Arc::new(Delivery {
        activity: activity.clone(),
        dialled: std::sync::Mutex::new(dialled),
        forwarded_client_cert: forwarded_client_cert(&arrival),
        policies,
        arrival,
        app,
        protocol,
        upstream: Mutex::new(None),
        metrics: Arc::clone(metrics),
    });
    let service = service_fn(move |request| Arc::clone(&delivery).handle(request));
    let io = TokioIo::new(stream);
    // The downstream side's bounds (`proxy::http::limits`), and a head must come whole within
    // HEADER_TIMEOUT.
    let served = if let Some(activity) = activity {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESET_STREAMS)
            .keep_alive_interval(limits.h2_keepalive_interval)
            .keep_alive_timeout(limits.h2_keepalive_timeout)
            .serve_connection(io, service);
        // Boxed, here and for HTTP/1: hyper's connection is most of a connection's state, and
        // inline it was copied, kilobytes at a time, at each level of the connection's task.
        let mut connection = Box::pin(connection);
        tokio::select! {
            served = connection.as_mut() => served,
            expired = activity.expired(HEADER_TIMEOUT, limits.http_idle_timeout) => {
                metrics.limit_hit(expired);
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(IDLE_CLOSE_GRACE, connection)
                    .await
                    .unwrap_or(Ok(()))
            }
        }
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, service)
            .with_upgrades();
        Box::pin(connection).await
    };
    if let Err(error) = served {
        tracing::debug!(%error, "inbound HTTP connection ended with an error");
    }
}

struct Delivery {
    /// HTTP/2's idle clock, which each request holds until its answer is done.
    activity: Option<Arc<Activity>>,
    /// Looked up again for the next request when the policies in force change.
    policies: Arc<PodPolicies>,
    arrival: Arc<Arrival>,
    app: App,
    /// The app's connection when it was dialled before the first request: used for it.
    dialled: std::sync::Mutex<Option<TcpStream>>,
    protocol: Detected,
    upstream: Mutex<Option<Upstream>>,
    forwarded_client_cert: Option<HeaderValue>,
    metrics: Arc<Metrics>,
}

/// The app's connection.
enum Upstream {
    Http1(conn::http1::SendRequest<Incoming>),
    Http2(conn::http2::SendRequest<Incoming>),
}

impl Delivery {
    /// Answers `request`, the answer's body reporting the request once it has been sent.
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Reported>, Infallible> {
        let started = Instant::now();
        let in_flight = self.activity.clone().map(InFlight::new);
        let protocol = if is_grpc(&request) {
            Protocol::Grpc
        } else {
            Protocol::Http
        };
        let request_bytes = request.body().size_hint().exact().unwrap_or(0);
        let Ok(response) = Arc::clone(&self).answer(request).await;
        let status = response.status().as_u16();
        Ok(response.map(|body| Reported {
            body,
            delivery: self,
            started,
            protocol,
            status,
            request_bytes,
            response_bytes: 0,
            _in_flight: in_flight,
        }))
    }

    async fn answer(
        self: Arc<Self>,
        mut request: Request<Incoming>,
    ) -> Result<Response<ReplyBody>, Infallible> {
        let normalized = {
            let normal = path::normalize(request.uri().path());
            let host = request
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| request.headers().get(HOST)?.to_str().ok())
                .unwrap_or_default();
            let http = HttpAttributes {
                method: request.method().as_str(),
                path: &normal,
                host,
                headers: request.headers(),
            };
            let decision = self
                .policies
                .current()
                .evaluate(&self.arrival.attributes(Some(http)));
            audit(
                &decision,
                &self.arrival,
                Some((request.method().as_str(), &normal)),
            );
            if !decision.allowed {
                tracing::debug!(
                    principal = self.arrival.client.as_ref().map(|c| c.as_str()),
                    method = %request.method(),
                    path = %normal,
                    policy = ?decision.denied_by,
                    "request denied by authorization policy"
                );
                self.metrics.authorization_denied("request");
                return Ok(reply(StatusCode::FORBIDDEN, "RBAC: access denied"));
            }
            match normal {
                Cow::Owned(normal) => Some(normal),
                Cow::Borrowed(_) => None,
            }
        };
        if let Some(normal) = normalized {
            rewrite_path(request.uri_mut(), &normal);
        }
        let upgrade = upgrade_asked(&request);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade {
            headers.insert(UPGRADE, protocol);
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        headers.remove(XFCC);
        if let Some(value) = &self.forwarded_client_cert {
            headers.insert(XFCC, value.clone());
        }
        let mut upstream = self.upstream.lock().await;
        if let Err(error) = self.ready(&mut upstream).await {
            tracing::debug!(address = %self.app.address, %error, "the app refused the connection");
            return Ok(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: \
                 connection failure",
            ));
        }
        let response = match upstream.as_mut() {
            // HTTP/1 takes one request at a time: the lock is held until the answer's head.
            Some(Upstream::Http1(sender)) => sender.send_request(request).await,
            Some(Upstream::Http2(sender)) => {
                let mut sender = sender.clone();
                drop(upstream);
                sender.send_request(request).await
            }
            None => unreachable!("ready() leaves a connection"),
        };
        Ok(match response {
            Ok(mut response) => {
                match client_upgrade {
                    Some(client) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                        let app = hyper::upgrade::on(&mut response);
                        tokio::spawn(carry_upgraded(client, app));
                    }
                    // The app's `Connection: close` ends its own connection, not the client's.
                    _ => strip_hop_by_hop(response.headers_mut()),
                }
                response.map(ReplyBody::Incoming)
            }
            Err(error) => {
                tracing::debug!(address = %self.app.address, %error, "the app's answer failed");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: \
                     connection termination",
                )
            }
        })
    }

    /// Leaves `upstream` holding a connection to the app that can take a request now: the one
    /// it held, or a new one when the app closed that (between requests, as apps do with idle
    /// or `Connection: close` connections).
    async fn ready(&self, upstream: &mut Option<Upstream>) -> anyhow::Result<()> {
        if let Some(held) = upstream.as_mut() {
            let ready = match held {
                Upstream::Http1(sender) => sender.ready().await,
                Upstream::Http2(sender) => sender.ready().await,
            };
            if ready.is_ok() {
                return Ok(());
            }
        }
        *upstream = Some(self.connect().await?);
        Ok(())
    }

    async fn connect(&self) -> anyhow::Result<Upstream> {
        let dialled = self
            .dialled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let stream = match dialled {
            Some(stream) => stream,
            None => self.app.connect().await?,
        };
        let io = TokioIo::new(stream);
        Ok(if self.protocol == Detected::Http2 {
            let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Upstream::Http2(sender)
        } else {
            let (sender, connection) = conn::http1::handshake(io).await?;
            tokio::spawn(connection.with_upgrades());
            Upstream::Http1(sender)
        })
    }
}

/// The protocol an HTTP/1 request asks to switch to (`Upgrade`, named in `Connection`, as a
/// WebSocket handshake does); the app's `101 Switching Protocols` hands both connections over
/// to [`carry_upgraded`].
fn upgrade_asked<B>(request: &Request<B>) -> Option<HeaderValue> {
    let connection_names_it = request
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("upgrade"));
    let asked = request.headers().get(UPGRADE)?;
    (connection_names_it && request.version() <= Version::HTTP_11).then(|| asked.clone())
}

/// Carries the bytes of an upgraded connection between the client and the app until either
/// ends.
async fn carry_upgraded(client: OnUpgrade, app: OnUpgrade) {
    let (client, app) = match tokio::try_join!(client, app) {
        Ok(both) => both,
        Err(error) => return tracing::debug!(%error, "protocol upgrade failed"),
    };
    let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// An answer's body, counted as it is sent; the request is reported when it is dropped (sent
/// whole, or given up by the client).
struct Reported {
    body: ReplyBody,
    delivery: Arc<Delivery>,
    started: Instant,
    protocol: Protocol,
    status: u16,
    request_bytes: u64,
    response_bytes: u64,
    _in_flight: Option<InFlight>,
}

impl Body for Reported {
    type Data = Bytes;
    type Error = <ReplyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            self.response_bytes += data.map_or(0, |d| d.len() as u64);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        self.delivery.metrics.record_request(
            &self.delivery.arrival.labels,
            &RequestOutcome {
                protocol: self.protocol,
                status: self.status,
                grpc_status: None,
                flags: &NoFlags,
                duration: self.started.elapsed(),
                request_bytes: self.request_bytes,
                response_bytes: self.response_bytes,
            },
        );
    }
}

/// `By=<this pod>;URI=<the client>`, as Istio's sidecars set it; `None` for plaintext.
fn forwarded_client_cert(arrival: &Arrival) -> Option<HeaderValue> {
    let client = arrival.client.as_ref()?;
    let value = match &arrival.server {
        Some(server) => format!("By={server};URI={client}"),
        None => format!("URI={client}"),
    };
    HeaderValue::from_str(&value).ok()
}

fn rewrite_path(uri: &mut Uri, normal: &str) {
    let mut parts = std::mem::take(uri).into_parts();
    let query = parts
        .path_and_query
        .as_ref()
        .and_then(PathAndQuery::query)
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    if let Ok(path) = PathAndQuery::try_from(format!("{normal}{query}")) {
        parts.path_and_query = Some(path);
    }
    if let Ok(rewritten) = Uri::from_parts(parts) {
        *uri = rewritten;
    }
}

fn reply(status: StatusCode, text: &'static str) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::Full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
