//! L4 through the proxy in process: connections to a service port that is not HTTP are
//! balanced by the engine and carried as bytes; connections to anything else go where they
//! were going.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use support::{echo_server, loopback, service, Backend, Mesh, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `bytes` on `stream`, closes its write side, and returns what came back.
async fn echo(mut stream: tokio::net::TcpStream, bytes: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(bytes).await.expect("write");
        write.shutdown().await.expect("shutdown");
    };
    let mut back = Vec::new();
    let receive = read.read_to_end(&mut back);
    let (_, received) = tokio::join!(send, receive);
    received.expect("read");
    back
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

async fn echo_service(port_name: &str) -> (Mesh, SocketAddrV4, std::net::SocketAddr) {
    let ip = loopback();
    let server = echo_server(ip).await;
    let vip = Ipv4Addr::new(10, 96, 0, 40);
    let yaml = service(
        "echo",
        vip,
        7000,
        port_name,
        &[Backend {
            pod: "echo-0",
            ip,
            labels: &[("app", "echo"), ("version", "v1")],
        }],
    );
    let options = Options {
        access_log: true,
        ..Options::default()
    };
    (
        Mesh::with(&yaml, options).await,
        SocketAddrV4::new(vip, 7000),
        server,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_without_a_protocol_is_detected_as_tcp_and_carried_to_an_endpoint() {
    let (mesh, vip, server) = echo_service("echo").await;
    let data = payload(100_000);
    for _ in 0..5 {
        let back = echo(mesh.connect(vip).await, &data).await;
        assert!(
            back == data,
            "echoed {} of {} bytes",
            back.len(),
            data.len()
        );
    }
    let lines = mesh.access_log(5).await;
    assert_eq!(lines.len(), 5, "{lines:?}");
    for line in &lines {
        assert_eq!(line["kind"], "tcp");
        assert_eq!(line["original_dst"], vip.to_string());
        assert_eq!(line["upstream"], server.to_string());
        assert_eq!(line["sent_bytes"], 100_000);
        assert_eq!(line["received_bytes"], 100_000);
        assert!(line["error"].is_null(), "{line}");
    }
    let labels = [
        ("destination_service", "echo.default.svc.cluster.local"),
        ("destination_version", "v1"),
        ("source_workload", "client-0"),
    ];
    assert_eq!(
        mesh.metric("istio_tcp_connections_opened_total", &labels),
        5.0
    );
    assert_eq!(
        mesh.metric("istio_tcp_connections_closed_total", &labels),
        5.0
    );
    assert_eq!(
        mesh.metric("istio_tcp_sent_bytes_total", &labels),
        500_000.0
    );
    assert_eq!(
        mesh.metric("istio_tcp_received_bytes_total", &labels),
        500_000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_port_is_never_read_as_http() {
    let (mesh, vip, _) = echo_service("tcp-echo").await;
    let request = b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n";
    assert_eq!(echo(mesh.connect(vip).await, request).await, request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outside_the_mesh_goes_where_it_was_going() {
    let (mesh, _, _) = echo_service("echo").await;
    let elsewhere = echo_server(loopback()).await;
    let std::net::SocketAddr::V4(elsewhere) = elsewhere else {
        unreachable!("IPv4 loopback")
    };
    let data = payload(10_000);
    assert!(echo(mesh.connect(elsewhere).await, &data).await == data);
    // Nothing listens there: the client's connection is closed, and the failure logged.
    let nowhere = SocketAddrV4::new(loopback(), 9);
    let mut refused = mesh.connect(nowhere).await;
    let mut got = Vec::new();
    let _ = refused.read_to_end(&mut got).await;
    assert!(got.is_empty());
    // A line is written when its connection ends, so the two may come in either order.
    let lines = mesh.access_log(2).await;
    let (carried, failed) = match lines[0]["upstream"].is_null() {
        false => (&lines[0], &lines[1]),
        true => (&lines[1], &lines[0]),
    };
    assert_eq!(carried["upstream"], elsewhere.to_string(), "{lines:?}");
    assert_eq!(carried["sent_bytes"], 10_000);
    assert!(failed["upstream"].is_null(), "{lines:?}");
    let error = failed["error"].as_str().expect("an error");
    assert!(error.starts_with("connect:"), "{error}");
    // Outside the mesh the destination is `unknown`.
    let outside = [("destination_service", "unknown")];
    assert_eq!(
        mesh.metric("istio_tcp_connections_opened_total", &outside),
        1.0
    );
}
