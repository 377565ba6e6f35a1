//! L4 forwarding: bytes both ways, untouched. The fallback for every non-HTTP connection. To a
//! known service VIP, the engine picks the endpoint (load balancing, outlier detection, connect
//! retries); to anything else, the connection goes where the client was going.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Instant,
};

use tokio::net::TcpStream;
use tracing::debug;

use super::{upstream, PodContext, Proxy};
use crate::{
    discovery::ServiceTarget,
    engine::{EngineError, Outcome, Verdict},
    telemetry::TcpRecord,
};

pub async fn forward(
    proxy: &Proxy,
    mut downstream: TcpStream,
    peer: SocketAddr,
    original: SocketAddrV4,
    pod: &PodContext,
    service: Option<&ServiceTarget>,
) {
    let started = Instant::now();
    let mut record = TcpRecord {
        source_pod: &pod.name,
        client_port: peer.port(),
        original_dst: original,
        upstream: None,
        sent_bytes: 0,
        received_bytes: 0,
        duration: started.elapsed(),
        error: None,
    };
    let connected = match service {
        Some(service) => connect_service(proxy, pod, service).await,
        None => upstream::connect(&pod.netns, proxy.agent_mark, original.into())
            .await
            .map(|stream| (stream, SocketAddr::V4(original)))
            .map_err(|error| format!("connect: {error}")),
    };
    match connected {
        Ok((mut upstream, endpoint)) => {
            record.upstream = Some(endpoint);
            let metrics = &proxy.telemetry.metrics;
            let snapshot = proxy.store.snapshot();
            let source = super::source_identity(&snapshot, pod);
            let destination = snapshot
                .discovered
                .workload_at(endpoint.ip())
                .map(|w| &w.identity);
            let peer = metrics.peer_labels(&source, service.map(|s| &*s.service), destination);
            drop(snapshot);
            let connection = metrics.tcp_connection(&peer);
            let copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            match copied {
                Ok((sent, received)) => {
                    connection.add_sent(sent);
                    connection.add_received(received);
                    connection.close(metrics, &crate::telemetry::metrics::NoFlags);
                    record.sent_bytes = sent;
                    record.received_bytes = received;
                }
                Err(error) => {
                    debug!(pod = %pod.name, %original, %error, "connection ended with an error");
                    record.error = Some(error.kind().to_string());
                }
            }
        }
        Err(error) => {
            debug!(pod = %pod.name, %original, %error, "no upstream connection");
            record.error = Some(error);
        }
    }
    record.duration = started.elapsed();
    proxy.telemetry.access_log.tcp(&record);
}

/// Connects to an endpoint of `service` chosen by the engine, retrying connect failures as the
/// service's policy allows.
async fn connect_service(
    proxy: &Proxy,
    pod: &PodContext,
    service: &ServiceTarget,
) -> Result<(TcpStream, SocketAddr), String> {
    let snapshot = proxy.store.snapshot();
    let authority = format!("{}:{}", service.service.host, service.port);
    let describe = |error: EngineError| format!("{} ({})", error, error.flags());
    let mut plan = snapshot
        .engine
        .route_tcp(&authority, &pod.namespace, service.port, Instant::now())
        .map_err(describe)?;
    loop {
        let attempt = plan.next_attempt(Instant::now()).map_err(describe)?;
        let endpoint = attempt.endpoint();
        let connecting = upstream::connect(&pod.netns, proxy.agent_mark, endpoint);
        let connected = match attempt.deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), connecting)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
            None => connecting.await,
        };
        // For outlier detection an established connection counts as a success.
        let outcome = match &connected {
            Ok(_) => Outcome::status(200),
            Err(_) => Outcome::ConnectFailure,
        };
        match (plan.report(attempt, outcome, Instant::now()), connected) {
            (Verdict::Forward, Ok(stream)) => return Ok((stream, endpoint)),
            (Verdict::RetryAt(at), _) => tokio::time::sleep_until(at.into()).await,
            (Verdict::Fail(error), _) => return Err(describe(error)),
            (Verdict::Forward, Err(error)) => return Err(format!("connect {endpoint}: {error}")),
        }
    }
}
