//! The proxy's drain, in process: what a superseded agent (a restart) or a SIGTERM does to the
//! connections it is serving. HTTP/1 has no GOAWAY, and closing a keep-alive connection between
//! requests races the client's next one; so a draining connection answers that next request
//! with `Connection: close`, and only one that stays idle is closed. No root needed.

mod support;

use std::time::{Duration, Instant};

use http::{header::CONNECTION, StatusCode};
use support::{get, loopback, service_c_yaml, Mesh, Upstream, SERVICE_C};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn mesh() -> (Mesh, [Upstream; 2]) {
    let (ip1, ip2) = (loopback(), loopback());
    let upstreams = [
        Upstream::start(ip1, "v1").await,
        Upstream::start(ip2, "v2").await,
    ];
    (Mesh::start(&service_c_yaml(ip1, ip2)).await, upstreams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_keep_alive_connection_answers_its_next_request_then_closes() {
    let (mesh, _upstreams) = mesh().await;
    let mut client = mesh.http1(SERVICE_C).await;
    let first = client.get("service-c:8080", "/").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.headers.get(CONNECTION),
        None,
        "keep-alive before the drain"
    );

    mesh.proxy.drain().start();
    // Idle at the moment the drain started, and not closed under the request sent now.
    let next = client.get("service-c:8080", "/").await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.headers.get(CONNECTION).unwrap(), "close");
    tokio::time::timeout(Duration::from_secs(5), mesh.proxy.drain().wait())
        .await
        .expect("the connection closed after its last answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_connection_that_stays_idle_is_closed_after_a_grace() {
    let (mesh, _upstreams) = mesh().await;
    let mut stream = mesh.connect(SERVICE_C).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: service-c:8080\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));

    let drained = Instant::now();
    mesh.proxy.drain().start();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s")
        .unwrap();
    let closed_after = drained.elapsed();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_secs(4),
        "{closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_the_drain_starts_finishes_and_says_close() {
    let (mesh, _upstreams) = mesh().await;
    let mut client = mesh.http1(SERVICE_C).await;
    let slow = tokio::spawn(async move { client.send(get("service-c:8080", "/delay/300")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    mesh.proxy.drain().start();
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers.get(CONNECTION).unwrap(), "close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_proxy_accepts_nothing_until_it_resumes() {
    let (mesh, _upstreams) = mesh().await;
    // A successor's, before it takes over: its listeners are there, its accept loops wait.
    mesh.proxy.drain().pause_accepting();
    let ingress = mesh.ingress().await;
    let mut stream = tokio::net::TcpStream::connect(ingress).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let waited = tokio::time::timeout(Duration::from_millis(300), stream.read_to_end(&mut answer));
    assert!(waited.await.is_err(), "answered while paused");
    mesh.proxy.drain().resume_accepting();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered once resumed")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
