//! A pod's tunnel listener: port 15008 inside the pod's network namespace, mutual TLS with the
//! pod's own certificate, an HTTP/2 server that accepts `CONNECT` to this pod's own address
//! only and carries each stream to the app, dialled from inside the pod — or, when the pod's
//! AuthorizationPolicies have a say, hands it to [`crate::inbound`] to be judged first.
//!
//! Bounded: connections per listener (`max_connections`, past which a new one is closed at once
//! and counted), streams per connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`, which the peer
//! must respect; h2 refuses a stream beyond it) and the time a client has to finish its TLS
//! and HTTP/2 handshakes (`handshake_timeout`). What a stream carries is bounded as the
//! downstream side bounds its connections (`http_idle_timeout`, HTTP/2 keep-alive pings; see
//! [`crate::inbound`]).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use h2::{server::SendResponse, Reason, RecvStream};
use http::{Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{
    metrics::INBOUND,
    outbound::refused,
    stream::{self, H2Stream},
    Hbone,
};
use crate::{
    authorization::Decision,
    identity::{spiffe::SpiffeId, tls},
    inbound::{self, Admission, App, Arrival, PodPolicies, Resettable},
    proxy::{upstream::Dialer, Drain},
    redirect::{netns::NetNs, Exemption},
    telemetry::Metered,
};

/// The pod a tunnel listener serves.
#[derive(Clone, Debug)]
pub struct InboundPod {
    pub name: String,
    pub namespace: String,
    /// Where the app is dialled from (`None`: the agent's own namespace, as in tests).
    pub netns: Option<Arc<NetNs>>,
    pub exemption: Exemption,
}

struct Listener {
    hbone: Arc<Hbone>,
    pod: InboundPod,
    dialer: Dialer,
    /// The server config of the pod's identity, rebuilt when the identity changes.
    config: Mutex<Option<(SpiffeId, Arc<ServerConfig>)>>,
}

/// Serves tunnels to `pod` on `listener` until accepting stops (drain, handover) or the task is
/// aborted (unenroll).
pub async fn serve(hbone: Arc<Hbone>, listener: TcpListener, pod: InboundPod, drain: Drain) {
    let listener_state = Arc::new(Listener {
        dialer: Dialer::new(pod.netns.clone(), pod.exemption.clone()),
        hbone,
        pod,
        config: Mutex::default(),
    });
    // The pod's certificate is obtained now, before the first client waits for it (a remote
    // signer's round trip, in Kubernetes mode); each handshake asks again, for renewals.
    if listener_state.server_config().await.is_none() {
        warn!(pod = %listener_state.pod.name, "no certificate yet: each tunnel will ask again");
    }
    let name = format!(
        "tunnel {}/{}",
        listener_state.pod.namespace, listener_state.pod.name
    );
    let metrics = Arc::clone(&listener_state.hbone.telemetry.metrics);
    let max_connections = listener_state.hbone.limits.max_connections;
    drain
        .accept_bounded(
            listener,
            &name,
            max_connections,
            || metrics.limit_hit("tunnel_connections"),
            |stream, peer| {
                let listener_state = Arc::clone(&listener_state);
                let draining = drain.clone();
                async move { listener_state.connection(stream, peer, &draining).await }
            },
        )
        .await;
}

impl Listener {
    /// The pod's identity now and a server config presenting it, its certificate ready.
    async fn server_config(&self) -> Option<(SpiffeId, Arc<ServerConfig>)> {
        let hbone = &self.hbone;
        let identity =
            hbone.pod_identity(&hbone.snapshot(), &self.pod.namespace, &self.pod.name)?;
        if let Err(error) = hbone.certificates.ready(&identity).await {
            warn!(pod = %self.pod.name, %identity, %error, "no certificate: tunnel refused");
            return None;
        }
        let mut held = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((id, config)) = &*held {
            if *id == identity {
                return Some((identity, Arc::clone(config)));
            }
        }
        let config = tls::server_config(Arc::clone(&hbone.certificates), identity.clone())
            .inspect_err(|error| warn!(%error, "tunnel server config"))
            .ok()?;
        *held = Some((identity.clone(), Arc::clone(&config)));
        Some((identity, config))
    }

    async fn connection(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, drain: &Drain) {
        let metrics = &self.hbone.metrics;
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let Some((identity, config)) = self.server_config().await else {
            return;
        };
        let handshake = tokio::time::timeout(
            self.hbone.limits.handshake_timeout,
            tls::accept(config, stream),
        )
        .await;
        let (stream, client) = match handshake {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(error)) => {
                debug!(%peer, %error, "tunnel handshake refused");
                metrics.handshake_failed(INBOUND, error.reason());
                return;
            }
            Err(_) => {
                debug!(%peer, "tunnel handshake timed out");
                metrics.handshake_failed(INBOUND, "timeout");
                return;
            }
        };
        metrics.handshake(INBOUND);
        let handshake = tokio::time::timeout(
            self.hbone.limits.handshake_timeout,
            stream::server_builder(self.hbone.limits.max_streams).handshake::<_, Bytes>(stream),
        )
        .await;
        let mut connection = match handshake {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                debug!(%peer, %error, "no HTTP/2 on the tunnel");
                return;
            }
            Err(_) => {
                debug!(%peer, "the tunnel's HTTP/2 preface timed out");
                return;
            }
        };
        let ends = Arc::new(Ends {
            local,
            peer,
            client,
            server: identity,
        });
        let ping_pong = connection
            .ping_pong()
            .expect("a new connection's pings are not taken yet");
        let keep_alive = stream::keep_alive(ping_pong);
        tokio::pin!(keep_alive);
        let mut draining = std::pin::pin!(drain.draining());
        let mut shutting_down = false;
        loop {
            // The connection makes progress, for every stream, only while it is polled here.
            let accepted = tokio::select! {
                accepted = connection.accept() => accepted,
                () = &mut draining, if !shutting_down => {
                    // Streams in flight finish; no new one is accepted.
                    connection.graceful_shutdown();
                    shutting_down = true;
                    continue;
                }
                why = &mut keep_alive => {
                    debug!(%peer, why, "tunnel given up");
                    return;
                }
            };
            match accepted {
                Some(Ok((request, respond))) => {
                    let this = Arc::clone(self);
                    let ends = Arc::clone(&ends);
                    tokio::spawn(async move { this.stream(request, respond, &ends).await });
                }
                Some(Err(error)) => {
                    debug!(%peer, %error, "tunnel connection ended");
                    return;
                }
                None => return,
            }
        }
    }

    /// One `CONNECT` stream: refused unless it names this pod's own address; otherwise judged
    /// by the pod's policies and delivered to the app (`inbound::deliver`, `inbound::inspect`).
    async fn stream(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        ends: &Ends,
    ) {
        let mut reply = |status: StatusCode| {
            refused(&self.hbone, status);
            let mut response = Response::new(());
            *response.status_mut() = status;
            // Nothing to do if the client went away meanwhile.
            let _ = respond.send_response(response, true);
        };
        if request.method() != Method::CONNECT {
            return reply(StatusCode::METHOD_NOT_ALLOWED);
        }
        let Some(target) = request
            .uri()
            .authority()
            .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
        else {
            return reply(StatusCode::BAD_REQUEST);
        };
        // The tunnel reached this pod at its own address: any other destination would make this
        // agent a relay into another pod (or anywhere the pod's namespace can reach).
        if target.ip() != ends.local.ip() {
            debug!(%target, pod = %self.pod.name, "CONNECT to another address refused");
            return reply(StatusCode::FORBIDDEN);
        }
        let arrival = Arrival {
            client: Some(ends.client.clone()),
            server: Some(ends.server.clone()),
            source: ends.peer.ip(),
            destination: target,
            labels: inbound::destination_labels(
                &self.hbone.snapshot(),
                &self.hbone.telemetry.metrics,
                (&self.pod.namespace, &self.pod.name),
                ends.peer.ip(),
                target,
                Some((&ends.client, &ends.server)),
            ),
        };
        let policies = Arc::new(self.policies());
        let app = self.app(target);
        // A connection admitted as such reaches the app before the stream opens, so that a
        // source agent sees an app that refuses as a failed connection (and retries it).
        enum Next {
            Deliver(TcpStream),
            Inspect(Decision),
        }
        let next = match inbound::admit(&policies.current(), &arrival) {
            Admission::Open => match app.connect().await {
                Ok(dialled) => Next::Deliver(dialled),
                Err(error) => {
                    debug!(%target, %error, "the app refused the tunnelled connection");
                    return reply(StatusCode::SERVICE_UNAVAILABLE);
                }
            },
            Admission::Inspect(decision) => Next::Inspect(decision),
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(error) => {
                debug!(%target, %error, "CONNECT stream never opened");
                return;
            }
        };
        self.hbone.metrics.stream(INBOUND);
        let tunnel = H2Stream::new(send, request.into_body());
        let metrics = &self.hbone.telemetry.metrics;
        let tunnel = Metered::new(tunnel, metrics.tcp_connection(&arrival.labels));
        let arrival = Arc::new(arrival);
        match next {
            Next::Deliver(dialled) => {
                inbound::deliver(tunnel, dialled, app, policies, arrival, metrics).await;
            }
            Next::Inspect(decision) => {
                inbound::inspect(tunnel, decision, policies, arrival, app, metrics).await;
            }
        }
    }

    /// The app at `address`, dialled from inside the pod.
    fn app(&self, address: SocketAddr) -> App {
        App {
            dialer: self.dialer.clone(),
            address,
            limits: self.hbone.limits,
        }
    }

    /// The AuthorizationPolicies of this pod, now and as they change.
    fn policies(&self) -> PodPolicies {
        PodPolicies::of_pod(&self.hbone.store, &self.pod.namespace, &self.pod.name)
    }
}

impl Resettable for Metered<H2Stream> {
    fn reset(&mut self) {
        self.inner_mut().reset(Reason::REFUSED_STREAM);
    }
}

/// Who is at each end of one tunnel connection.
struct Ends {
    /// This pod's address and port 15008.
    local: SocketAddr,
    /// The source agent's socket (the source pod's address when it dialled from the pod).
    peer: SocketAddr,
    client: SpiffeId,
    server: SpiffeId,
}
