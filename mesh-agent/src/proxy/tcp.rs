//! L4 forwarding: bytes both ways, untouched. The fallback for every non-HTTP connection. To a
//! known service VIP, the engine picks the endpoint (load balancing, outlier detection, connect
//! retries); to anything else, the connection goes where the client was going.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Instant,
};

use tokio::net::TcpStream;
use tracing::debug;

use super::pod::PodContext;
use crate::{
    discovery::ServiceTarget,
    engine::{EngineError, Outcome, Verdict},
    identity::WorkloadIdentity,
    state::Store,
    telemetry::{ConnectionRecord, Telemetry},
};

/// Carries `downstream` to the service's endpoint (`service`) or else to `original`, and
/// records the connection.
pub async fn forward(
    store: &Store,
    telemetry: &Telemetry,
    pod: &PodContext,
    mut downstream: TcpStream,
    original: SocketAddrV4,
    service: Option<&ServiceTarget>,
) {
    let client_port = downstream.peer_addr().map_or(0, |peer| peer.port());
    let mut record = ConnectionRecord::start(telemetry, &pod.name, client_port, original);
    let connected = match service {
        Some(service) => connect_service(store, pod, service).await,
        None => pod
            .dialer
            .connect(original.into())
            .await
            .map(|stream| (stream, SocketAddr::V4(original), None))
            .map_err(|error| format!("connect: {error}")),
    };
    let (mut upstream, endpoint, workload) = match connected {
        Ok(connected) => connected,
        Err(error) => {
            debug!(pod = %pod.name, %original, %error, "no upstream connection");
            record.failed(error);
            return;
        }
    };
    {
        let snapshot = store.snapshot();
        let source = pod.identity(&snapshot);
        // Outside a service, the destination may still be a pod the mesh knows.
        let known = || Some(&*snapshot.discovered.workload_at(endpoint.ip())?.identity);
        record.connected(
            endpoint,
            &source,
            service.map(|s| &*s.service),
            workload.as_deref().or_else(known),
        );
    }
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => record.transferred(sent, received),
        Err(error) => {
            debug!(pod = %pod.name, %original, %error, "connection ended with an error");
            record.failed(error.kind().to_string());
        }
    }
}

/// Connects to an endpoint of `service` chosen by the engine, retrying connect failures as the
/// service's policy allows. Returns the stream, the endpoint and its workload.
async fn connect_service(
    store: &Store,
    pod: &PodContext,
    service: &ServiceTarget,
) -> Result<(TcpStream, SocketAddr, Option<Arc<WorkloadIdentity>>), String> {
    let snapshot = store.snapshot();
    let authority = format!("{}:{}", service.service.host, service.port);
    let describe = |error: EngineError| format!("{} ({})", error, error.flags());
    let mut plan = snapshot
        .engine
        .route_tcp(&authority, &pod.namespace, service.port, Instant::now())
        .map_err(describe)?;
    loop {
        let attempt = plan.next_attempt(Instant::now()).map_err(describe)?;
        let endpoint = attempt.endpoint();
        let workload = attempt.workload().cloned();
        let connecting = pod.dialer.connect(endpoint);
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
            (Verdict::Forward, Ok(stream)) => return Ok((stream, endpoint, workload)),
            (Verdict::RetryAt(at), _) => tokio::time::sleep_until(at.into()).await,
            (Verdict::Fail(error), _) => return Err(describe(error)),
            (Verdict::Forward, Err(error)) => return Err(format!("connect {endpoint}: {error}")),
        }
    }
}
