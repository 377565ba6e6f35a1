//! A source pod's tunnels: pooled HTTP/2 connections over mutual TLS to destination pods'
//! agents, one `CONNECT` stream per proxied connection.
//!
//! One connection per (source identity, destination pod IP, destination identity), shared by
//! every connection the pod makes there; a dial for a key waits for the one already opening it,
//! so a burst of requests opens one tunnel, not one each. A connection that has closed (the peer
//! went away, its agent restarted) is dialled again by the next request.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::task::JoinHandle;
use tracing::debug;

use super::{
    metrics::{INBOUND, OUTBOUND},
    stream::{self, H2Stream},
    Hbone, PORT,
};
use crate::{
    identity::{
        spiffe::{Route, SpiffeId},
        tls,
    },
    proxy::upstream::{Dialer, TunnelStream, Tunnels},
};

/// One open tunnel connection: where its streams are opened, and the task that drives it.
#[derive(Clone)]
struct Sender {
    requests: h2::client::SendRequest<Bytes>,
    connection: Arc<JoinHandle<()>>,
}

impl Sender {
    /// The connection ended (its peer closed it, a keep-alive went unanswered, an error).
    fn is_closed(&self) -> bool {
        self.connection.is_finished()
    }
}

/// Whose identity a pod's tunnels present.
#[derive(Clone, Debug)]
pub enum Source {
    /// An enrolled pod's: its service account's, as discovery knows it when the tunnel opens.
    Pod { namespace: String, name: String },
    /// A fixed one (the ingress gateway's).
    Fixed(SpiffeId),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    source: SpiffeId,
    ip: IpAddr,
    destination: SpiffeId,
}

/// Why no tunnel stream opened: each is a connect failure for the engine.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no certificate for {identity}: {error}")]
    Certificate {
        identity: SpiffeId,
        error: crate::identity::certificates::CertificateError,
    },
    #[error("dialling the tunnel port {0}: {1}")]
    Dial(SocketAddr, io::Error),
    #[error("tunnel handshake with {0}: {1}")]
    Handshake(SocketAddr, tls::HandshakeError),
    #[error("TLS config: {0}")]
    Config(#[from] tls::TlsConfigError),
    #[error("HTTP/2 on the tunnel to {0}: {1}")]
    Http2(SocketAddr, h2::Error),
    #[error("CONNECT {0} refused: {1}")]
    Refused(SocketAddr, StatusCode),
}

impl TunnelError {
    /// A short, fixed label for a metric.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Certificate { .. } | TunnelError::Config(_) => "certificate",
            TunnelError::Dial(..) => "dial",
            TunnelError::Handshake(..) => "handshake",
            TunnelError::Http2(..) => "http2",
            TunnelError::Refused(..) => "refused",
        }
    }
}

/// A source pod's tunnels (see the module docs).
pub struct TunnelClient {
    hbone: Arc<Hbone>,
    source: Source,
    connections: Mutex<Connections>,
    /// Identities as of one snapshot: [`TunnelClient::route`] runs for every request, and
    /// building a SPIFFE ID formats and checks its URI.
    routes: Mutex<RouteCache>,
}

/// Most destinations a pod's route cache holds; past it, it starts over.
const MAX_CACHED_ROUTES: usize = 4096;

#[derive(Default)]
struct RouteCache {
    /// The snapshot the identities below were read from.
    version: Option<u64>,
    source: Option<SpiffeId>,
    /// Pod IP → the identity expected there (`None`: not in the mesh).
    destinations: HashMap<IpAddr, Option<SpiffeId>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

#[derive(Default)]
struct Connections {
    slots: HashMap<Key, Slot>,
    /// The size at which keys without an open connection are swept out next.
    sweep_at: usize,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl TunnelClient {
    pub fn new(hbone: Arc<Hbone>, source: Source) -> Self {
        TunnelClient {
            hbone,
            source,
            connections: Mutex::default(),
            routes: Mutex::default(),
        }
    }

    /// The tunnel a connection to `endpoint` goes through now, or `None`: plaintext (a
    /// destination outside the mesh, or a source whose name cannot be an identity).
    pub fn route(&self, endpoint: SocketAddr) -> Option<Route> {
        let snapshot = self.hbone.snapshot();
        let mut cache = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.version != Some(snapshot.version) || cache.destinations.len() >= MAX_CACHED_ROUTES
        {
            cache.destinations.clear();
            cache.source = match &self.source {
                Source::Pod { namespace, name } => {
                    self.hbone.pod_identity(&snapshot, namespace, name)
                }
                Source::Fixed(identity) => Some(identity.clone()),
            };
            cache.version = Some(snapshot.version);
        }
        let source = cache.source.clone()?;
        let destination = cache
            .destinations
            .entry(endpoint.ip())
            .or_insert_with(|| self.hbone.destination(&snapshot, endpoint))
            .clone()?;
        Some(Route {
            source,
            destination,
        })
    }

    /// Opens a `CONNECT endpoint` stream on the pooled tunnel of `route` to `endpoint`'s pod,
    /// dialling it (through `dialer`: from the pod's namespace, exempted) if none is open.
    pub async fn connect(
        &self,
        route: &Route,
        endpoint: SocketAddr,
        dialer: &Dialer,
    ) -> Result<TunnelStream, TunnelError> {
        self.open(route, endpoint, dialer)
            .await
            .inspect_err(|error| self.hbone.metrics.connect_failed(error.reason()))
    }

    async fn open(
        &self,
        route: &Route,
        endpoint: SocketAddr,
        dialer: &Dialer,
    ) -> Result<TunnelStream, TunnelError> {
        let key = Key {
            source: route.source.clone(),
            ip: endpoint.ip(),
            destination: route.destination.clone(),
        };
        let slot = self.slot(&key);
        let tunnel = SocketAddr::new(endpoint.ip(), PORT);
        let mut fresh = false;
        let (response, send) = loop {
            let sender = {
                let mut held = slot.lock().await;
                match &*held {
                    Some(sender) if !sender.is_closed() && !fresh => sender.clone(),
                    _ => {
                        *held = None;
                        let sender = self.dial(&key, dialer).await?;
                        *held = Some(sender.clone());
                        fresh = true;
                        sender
                    }
                }
            };
            match open_stream(sender.requests, endpoint).await {
                Ok(opened) => break opened,
                // A pooled connection may have been closing (its peer draining, a GOAWAY in
                // flight): the stream goes once more, on a connection of its own.
                Err(error) if !fresh => {
                    debug!(%tunnel, %error, "pooled tunnel closed under a new stream; dialling");
                    fresh = true;
                    *slot.lock().await = None;
                }
                Err(error) => {
                    // The connection failed under us: the next connect dials a new one.
                    self.forget(&slot).await;
                    return Err(TunnelError::Http2(tunnel, error));
                }
            }
        };
        if response.status() != StatusCode::OK {
            self.hbone
                .metrics
                .stream_refused(OUTBOUND, refusal_reason(response.status()));
            return Err(TunnelError::Refused(endpoint, response.status()));
        }
        self.hbone.metrics.stream(OUTBOUND);
        Ok(Box::new(H2Stream::new(send, response.into_body())))
    }

    async fn forget(&self, slot: &tokio::sync::Mutex<Option<Sender>>) {
        let mut held = slot.lock().await;
        if held.as_ref().is_some_and(Sender::is_closed) {
            *held = None;
        }
    }

    /// The place of `key`'s connection. Keys of pods long gone would pile up: past a size that
    /// doubles with the live ones, keys without an open connection are swept out.
    fn slot(&self, key: &Key) -> Slot {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = connections.slots.get(key) {
            return Arc::clone(slot);
        }
        if connections.slots.len() >= connections.sweep_at {
            connections.slots.retain(|_, slot| {
                // One being dialled is locked: kept.
                slot.try_lock()
                    .map_or(true, |held| held.as_ref().is_some_and(|s| !s.is_closed()))
            });
            connections.sweep_at = (connections.slots.len() * 2).max(64);
        }
        Arc::clone(connections.slots.entry(key.clone()).or_default())
    }

    async fn dial(&self, key: &Key, dialer: &Dialer) -> Result<Sender, TunnelError> {
        let certificates = self.hbone.certificates();
        certificates
            .ready(&key.source)
            .await
            .map_err(|error| TunnelError::Certificate {
                identity: key.source.clone(),
                error,
            })?;
        let tunnel = SocketAddr::new(key.ip, PORT);
        let tcp = dialer
            .connect_tcp(tunnel)
            .await
            .map_err(|error| TunnelError::Dial(tunnel, error))?;
        let config = tls::client_config(
            Arc::clone(certificates),
            key.source.clone(),
            key.destination.clone(),
        )?;
        let (stream, _) = tls::connect(config, ServerName::IpAddress(key.ip.into()), tcp)
            .await
            .map_err(|error| {
                self.hbone
                    .metrics
                    .handshake_failed(OUTBOUND, error.reason());
                TunnelError::Handshake(tunnel, error)
            })?;
        let (requests, mut connection) = stream::client_builder()
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|error| TunnelError::Http2(tunnel, error))?;
        self.hbone.metrics.handshake(OUTBOUND);
        debug!(source = %key.source, destination = %key.destination, %tunnel, "tunnel open");
        let ping_pong = connection
            .ping_pong()
            .expect("a new connection's pings are not taken yet");
        let connection = tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    // A TLS 1.3 server refuses a client's certificate after the client's
                    // handshake has finished: the refusal shows here.
                    debug!(%tunnel, %error, "tunnel connection ended");
                },
                // The next connect dials again instead of waiting on a dead tunnel.
                why = stream::keep_alive(ping_pong) => debug!(%tunnel, why, "tunnel given up"),
            }
        });
        Ok(Sender {
            requests,
            connection: Arc::new(connection),
        })
    }
}

/// Sends `CONNECT endpoint` on a tunnel connection, once it has room for another stream; the
/// response and the stream's sending half.
async fn open_stream(
    requests: h2::client::SendRequest<Bytes>,
    endpoint: SocketAddr,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), h2::Error> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(endpoint.to_string())
        .body(())
        .expect("a CONNECT request to a socket address is valid");
    let (response, send) = requests.ready().await?.send_request(request, false)?;
    Ok((response.await?, send))
}

fn refusal_reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "destination_unreachable",
        _ => "other",
    }
}

/// Both directions count the same reasons.
pub(super) fn refused(hbone: &Hbone, status: StatusCode) {
    hbone
        .metrics
        .stream_refused(INBOUND, refusal_reason(status));
}

impl Tunnels for TunnelClient {
    fn route(&self, addr: SocketAddr) -> Option<Route> {
        TunnelClient::route(self, addr)
    }

    fn connect<'a>(
        &'a self,
        route: &'a Route,
        addr: SocketAddr,
        dialer: &'a Dialer,
    ) -> Pin<Box<dyn Future<Output = io::Result<TunnelStream>> + Send + 'a>> {
        Box::pin(async move {
            TunnelClient::connect(self, route, addr, dialer)
                .await
                .map_err(|error| io::Error::new(io::ErrorKind::ConnectionRefused, error))
        })
    }
}
