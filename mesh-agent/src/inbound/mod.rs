//! The destination side of a connection that reaches a pod in the mesh, through a tunnel
//! (`crate::hbone`) or captured in plaintext by the kernel ([`plaintext`]): the pod's
//! `AuthorizationPolicies` ([`crate::authorization`]) judge it, and what they admit is delivered
//! to the app, dialled from inside the pod.
//!
//! - No policy applies, or the connection is allowed and no rule reads HTTP
//!   ([`Admission::Open`]): the app is dialled, then [`deliver`]ed: HTTP is served ([`http`]),
//!   so that each request is reported by the destination, and anything else carried as bytes.
//! - Otherwise its first bytes say whether it is HTTP (as outbound protocol detection does,
//!   within [`DETECT_TIMEOUT`]) before the app is dialled ([`inspect`]). HTTP is served here:
//!   each request is judged with its method, path, host and headers, and answered
//!   `403 RBAC: access denied` or forwarded to the app. Anything else is judged as a
//!   connection: reset when denied, else carried.
//!
//! The identity judged is the one the tunnel's mutual TLS proved (none for plaintext), never a
//! header: the request the app receives carries an `x-forwarded-client-cert` this agent wrote,
//! or none, never the client's.

pub mod http;
pub mod plaintext;
mod prefixed;

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
    sync::watch,
};

pub use prefixed::Prefixed;

use crate::{
    authorization::{Attributes, Authorization, Decision, HttpAttributes, Policies},
    identity::{spiffe::SpiffeId, WorkloadIdentity},
    proxy::{
        detect::{classify, Detected},
        limits, tcp,
        upstream::Dialer,
    },
    state::{Snapshot, Store},
    telemetry::metrics::{Metrics, PeerLabels, Reporter, Security},
};

/// How long a judged connection's first bytes may take to say whether it is HTTP; a client
/// that says nothing by then (a server-first protocol) is judged as a connection.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// Who arrives, from where, for which address of the pod.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Proven by the tunnel's mutual TLS; `None`: plaintext.
    pub client: Option<SpiffeId>,
    /// This pod's identity, for `x-forwarded-client-cert`.
    pub server: Option<SpiffeId>,
    pub source: IpAddr,
    pub destination: SocketAddr,
    /// How the destination's telemetry names the caller and this pod
    /// (`reporter="destination"`).
    pub labels: Arc<PeerLabels>,
}

impl Arrival {
    pub fn attributes<'a>(&'a self, http: Option<HttpAttributes<'a>>) -> Attributes<'a> {
        Attributes {
            principal: self.client.as_ref().map(SpiffeId::principal),
            source: self.source,
            destination: self.destination,
            http,
        }
    }
}

/// The inbound side's bounds: the tunnel's, and those of what arrives through it or through
/// the pod's plaintext listener.
#[derive(Clone, Copy, Debug)]
pub struct InboundLimits {
    /// Tunnel connections one pod's listener holds at once.
    pub max_connections: usize,
    /// Streams (proxied connections) one tunnel connection carries at once.
    pub max_streams: u32,
    /// How long a client has from its TCP connection to a finished TLS handshake, and again
    /// from there to its HTTP/2 preface and settings.
    pub handshake_timeout: Duration,
    /// How long the dial to the app inside the pod may take.
    pub connect_timeout: Duration,
    /// How long an HTTP/2 connection served for the app may go with no request in flight
    /// before it is sent GOAWAY and closed (`Limits::http_idle_timeout`).
    pub http_idle_timeout: Duration,
    /// Keep-alive pings on such a connection, and how late an answer may be
    /// (`Limits::h2_keepalive_interval`, `Limits::h2_keepalive_timeout`).
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// How long a connection carried as bytes may go without a byte either way
    /// (`Limits::tcp_idle_timeout`).
    pub tcp_idle_timeout: Duration,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            max_connections: 1024,
            max_streams: 128,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            http_idle_timeout: limits::DEFAULT_HTTP_IDLE_TIMEOUT,
            h2_keepalive_interval: limits::DEFAULT_H2_KEEPALIVE_INTERVAL,
            h2_keepalive_timeout: limits::DEFAULT_H2_KEEPALIVE_TIMEOUT,
            tcp_idle_timeout: limits::DEFAULT_TCP_IDLE_TIMEOUT,
        }
    }
}

/// The app behind the pod's address, dialled when something is to be delivered; and the bounds
/// its clients' connections are served under.
#[derive(Clone, Debug)]
pub struct App {
    pub dialer: Dialer,
    pub address: SocketAddr,
    pub limits: InboundLimits,
}

impl App {
    pub async fn connect(&self) -> io::Result<TcpStream> {
        self.dialer
            .connect_tcp_within(self.address, self.limits.connect_timeout)
            .await
    }
}

/// One pod's policies as they change: looked up again, at the next request or connection
/// judged, after the store said the policies in force changed.
pub struct PodPolicies {
    changes: Mutex<watch::Receiver<Arc<Authorization>>>,
    lookup: Box<dyn Fn() -> Policies + Send + Sync>,
    current: Mutex<Policies>,
}

impl PodPolicies {
    /// The AuthorizationPolicies of pod `namespace/name` in `store`, now and as they change
    /// (its labels are looked up each time, from discovery).
    pub fn of_pod(store: &Arc<Store>, namespace: &str, name: &str) -> Self {
        let changes = store.authorization_changes();
        let store = Arc::clone(store);
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        PodPolicies::new(changes, move || {
            let snapshot = store.snapshot();
            snapshot
                .authorization
                .for_workload(&namespace, pod_labels(&snapshot, &namespace, &name))
        })
    }

    /// `changes` must be subscribed before `lookup` first runs, so that no change is missed.
    pub fn new(
        changes: watch::Receiver<Arc<Authorization>>,
        lookup: impl Fn() -> Policies + Send + Sync + 'static,
    ) -> Self {
        let current = Mutex::new(lookup());
        PodPolicies {
            changes: Mutex::new(changes),
            lookup: Box::new(lookup),
            current,
        }
    }

    /// The policies in force now.
    pub fn current(&self) -> Policies {
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if changes.has_changed().unwrap_or(false) {
            changes.borrow_and_update();
            *current = (self.lookup)();
        }
        current.clone()
    }

    /// Resolves when the policies in force change (never, once the store is gone).
    async fn changed(&self) {
        let mut changes = self
            .changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Carries `client` and `app` both ways until one ends, or until the pod's policies change so
/// that they no longer admit this connection as a connection: then it is reset, and its
/// client, which reconnects, is judged under the new ones (a connection a new `DENY` names,
/// or one whose requests a new rule reads, does not outlive the change). Returns the bytes
/// carried each way when it ended by itself, or an error when it ended by going
/// `idle_timeout` without a byte either way (then both sides are closed, and it is counted).
async fn carry_while_admitted<S: Resettable>(
    client: &mut S,
    app: &mut TcpStream,
    idle_timeout: Duration,
    policies: &PodPolicies,
    arrival: &Arrival,
    metrics: &Metrics,
) -> Option<io::Result<(u64, u64)>> {
    let still_admitted = {
        let activity = tcp::Activity::new();
        let mut client = tcp::Watched::new(&mut *client, &activity);
        let copy = tokio::io::copy_bidirectional(&mut client, app);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                copied = &mut copy => return Some(copied),
                () = activity.idle_for(idle_timeout) => {
                    metrics.limit_hit("tcp_idle_timeout");
                    return Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no byte either way for the TCP idle timeout",
                    )));
                }
                () = policies.changed() => {
                    let current = policies.current();
                    let decision = current.evaluate(&arrival.attributes(None));
                    if !(current.is_empty() || decision.allowed) {
                        break false;
                    }
                }
            }
        }
    };
    debug_assert!(!still_admitted);
    tracing::debug!(
        source = %arrival.source,
        destination = %arrival.destination,
        "connection reset: the policies in force changed and no longer admit it"
    );
    metrics.authorization_denied("connection");
    client.reset();
    None
}

/// How the destination's telemetry (`reporter="destination"`) names a connection from `peer`
/// to `destination`, an address of pod `namespace/name`: the caller's workload as discovery
/// knows its address (`unknown` otherwise), the pod's, and the service with an endpoint at
/// `destination` (see `Discovered::service_of_endpoint`). `principals`: the tunnel's (client,
/// server).
pub fn destination_labels(
    snapshot: &Snapshot,
    metrics: &Metrics,
    (namespace, name): (&str, &str),
    peer: IpAddr,
    destination: SocketAddr,
    principals: Option<(&SpiffeId, &SpiffeId)>,
) -> Arc<PeerLabels> {
    static UNKNOWN_SOURCE: LazyLock<WorkloadIdentity> =
        LazyLock::new(|| WorkloadIdentity::from_pod_labels("unknown", "unknown", &BTreeMap::new()));
    let discovered = &snapshot.discovered;
    let source = discovered
        .workload_at(peer)
        .map_or(&*UNKNOWN_SOURCE, |workload| &workload.identity);
    metrics.secured_peer_labels(
        source,
        discovered.service_of_endpoint(destination).map(|s| &**s),
        discovered.pod(namespace, name).map(|w| &*w.identity),
        Security {
            reporter: Reporter::Destination,
            principals,
        },
    )
}

/// The labels of pod `namespace/name` as discovery has them (none while it has no `Pod`).
pub fn pod_labels<'a>(
    snapshot: &'a Snapshot,
    namespace: &str,
    name: &str,
) -> &'a BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    snapshot
        .discovered
        .pod(namespace, name)
        .map_or(&NONE, |workload| &workload.labels)
}

/// What happens to a connection before any of its bytes are read.
#[derive(Debug)]
pub enum Admission {
    /// Carried as bytes.
    Open,
    /// Its first bytes decide ([`inspect`]); `Decision` is its judgement as a connection.
    Inspect(Decision),
}

pub fn admit(policies: &Policies, arrival: &Arrival) -> Admission {
    if policies.is_empty() {
        return Admission::Open;
    }
    let decision = policies.evaluate(&arrival.attributes(None));
    if decision.allowed && !policies.reads_http() {
        Admission::Open
    } else {
        Admission::Inspect(decision)
    }
}

/// A stream that can be reset, so that a denied connection looks refused to its client.
pub trait Resettable: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    fn reset(&mut self);
}

/// Delivers a connection admitted as such to its app, dialled already: when the client's first
/// bytes say HTTP it is served per request ([`http`]: each request reported, and judged again
/// should the policies change); anything else is carried as bytes until it ends or the
/// policies no longer admit it (then reset). The app speaking first (a server-first
/// protocol such as MySQL or SMTP) settles it at once, without waiting for detection.
pub async fn deliver<S: Resettable>(
    mut client: S,
    mut app: TcpStream,
    dial: App,
    policies: Arc<PodPolicies>,
    arrival: Arc<Arrival>,
    metrics: &Arc<Metrics>,
) {
    let mut read = BytesMut::with_capacity(64);
    let detected = tokio::select! {
        biased;
        detected = tokio::time::timeout(DETECT_TIMEOUT, classify_first_bytes(&mut client, &mut read)) => {
            detected.unwrap_or(Detected::Other)
        }
        _ = app.readable() => Detected::Other,
    };
    let mut client = Prefixed::new(read.freeze(), client);
    if matches!(detected, Detected::Http1 | Detected::Http2) {
        return http::serve(
            client,
            detected,
            policies,
            arrival,
            dial,
            Some(app),
            metrics,
        )
        .await;
    }
    let idle_timeout = dial.limits.tcp_idle_timeout;
    carry(
        &mut client,
        &mut app,
        idle_timeout,
        &policies,
        &arrival,
        metrics,
    )
    .await;
}

/// Reads the first bytes of `stream` and acts on them: HTTP is served and judged per request
/// until the client is done; anything else is judged by `as_connection`: reset when denied,
/// else carried to the app.
pub async fn inspect<S: Resettable>(
    mut stream: S,
    as_connection: Decision,
    policies: Arc<PodPolicies>,
    arrival: Arc<Arrival>,
    app: App,
    metrics: &Arc<Metrics>,
) {
    let (prefix, detected) = first_bytes(&mut stream).await;
    let mut stream = Prefixed::new(prefix, stream);
    if matches!(detected, Detected::Http1 | Detected::Http2) {
        return http::serve(stream, detected, policies, arrival, app, None, metrics).await;
    }
    if !as_connection.allowed {
        tracing::debug!(
            source = %arrival.source,
            destination = %arrival.destination,
            policy = ?as_connection.denied_by,
            "connection denied by authorization policy"
        );
        metrics.authorization_denied("connection");
        stream.inner_mut().reset();
        return;
    }
    audit(&as_connection, &arrival, None);
    match app.connect().await {
        Ok(mut dialled) => {
            let idle_timeout = app.limits.tcp_idle_timeout;
            carry(
                &mut stream,
                &mut dialled,
                idle_timeout,
                &policies,
                &arrival,
                metrics,
            )
            .await;
        }
        Err(error) => {
            tracing::debug!(address = %app.address, %error, "the app refused the connection");
            stream.inner_mut().reset();
        }
    }
}

/// [`carry_while_admitted`], its end logged.
async fn carry<S: Resettable>(
    client: &mut S,
    app: &mut TcpStream,
    idle_timeout: Duration,
    policies: &PodPolicies,
    arrival: &Arrival,
    metrics: &Metrics,
) {
    let carried = carry_while_admitted(client, app, idle_timeout, policies, arrival, metrics).await;
    if let Some(Err(error)) = carried {
        tracing::debug!(source = %arrival.source, %error, "inbound connection ended with an error");
    }
}

/// Logs what an `AUDIT` policy matched.
fn audit(decision: &Decision, arrival: &Arrival, request: Option<(&str, &str)>) {
    if let Some(policy) = &decision.audited_by {
        tracing::info!(
            policy = %format_args!("{}/{}", policy.namespace, policy.name),
            principal = arrival.client.as_ref().map(SpiffeId::as_str),
            source = %arrival.source,
            destination = %arrival.destination,
            method = request.map(|(method, _)| method),
            path = request.map(|(_, path)| path),
            allowed = decision.allowed,
            "authorization audit"
        );
    }
}

/// Reads until the bytes say HTTP/1, HTTP/2 or neither, the client pauses past
/// [`DETECT_TIMEOUT`], or it ends; returns what was read.
async fn first_bytes<S: AsyncRead + Unpin>(stream: &mut S) -> (Bytes, Detected) {
    let mut read = BytesMut::with_capacity(64);
    let detected = tokio::time::timeout(DETECT_TIMEOUT, classify_first_bytes(stream, &mut read))
        .await
        .unwrap_or(Detected::Other);
    (read.freeze(), detected)
}

/// Reads into `read` until its bytes say HTTP/1, HTTP/2 or neither, or `stream` ends. What was
/// read stays in `read` if this is dropped before it ends.
async fn classify_first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    read: &mut BytesMut,
) -> Detected {
    loop {
        match stream.read_buf(read).await {
            Ok(0) | Err(_) => return Detected::Other,
            Ok(_) => {}
        }
        if let Some(detected) = classify(read) {
            return detected;
        }
    }
}

#[cfg(test)]
mod tests;
