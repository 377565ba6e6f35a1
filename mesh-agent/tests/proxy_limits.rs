//! The data path's bounds in process (`proxy::Limits`, `http::limits`): each timeout, cap and
//! budget is hit here and does what docs/reliability.md says. The timeouts run on the real
//! clock here, shortened (tokio's paused clock jumps ahead while a real socket is in flight, so
//! it cannot time real connections); their logic is unit-tested on the paused clock.

mod support;

use std::{net::SocketAddrV4, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use mesh_agent::proxy::Limits;
use support::{echo_server, loopback, service, Backend, Body, Mesh, Options, Upstream, SERVICE_C};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

const HEADER_TIMEOUT: Duration = Duration::from_millis(500);
const IDLE_TIMEOUT: Duration = Duration::from_millis(800);
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(1000);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(300);
const TCP_IDLE_TIMEOUT: Duration = Duration::from_millis(600);
/// How late a close may come on a busy test machine.
const SLACK: Duration = Duration::from_millis(700);
/// How long a closed-for-idleness HTTP/2 connection has to take its GOAWAY (a client that
/// does not answer the proxy's ping, as these raw ones, is dropped after it).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

fn short_limits() -> Limits {
    Limits {
        http_header_timeout: HEADER_TIMEOUT,
        http_idle_timeout: IDLE_TIMEOUT,
        h2_keepalive_interval: KEEPALIVE_INTERVAL,
        h2_keepalive_timeout: KEEPALIVE_TIMEOUT,
        tcp_idle_timeout: TCP_IDLE_TIMEOUT,
        ..Limits::default()
    }
}

fn closed_in_time(what: &str, after: Duration, from: Duration, to: Duration) {
    assert!(
        after >= from && after <= to,
        "{what}: closed after {after:?}, want {from:?} to {to:?}"
    );
}

/// `service-c` (port 8080, HTTP) with one endpoint, under `limits`, plus `rules`.
async fn service_c(limits: Limits, rules: &str) -> (Mesh, Upstream) {
    let ip = loopback();
    let upstream = Upstream::start(ip, "v1").await;
    let mut yaml = service(
        "service-c",
        *SERVICE_C.ip(),
        SERVICE_C.port(),
        "http",
        &[Backend {
            pod: "service-c-0",
            ip,
            labels: &[("app", "service-c")],
        }],
    );
    if !rules.is_empty() {
        yaml.push_str("\n---\n");
        yaml.push_str(rules);
    }
    let options = Options {
        limits,
        ..Options::default()
    };
    (Mesh::with(&yaml, options).await, upstream)
}

/// Reads until the proxy closes the connection; returns everything it sent and when it closed.
async fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return (received, Instant::now()),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The frames in `bytes`: (type, flags, stream, payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        frames.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    frames
}

/// A request head in HPACK using only the static table and literals (no Huffman):
/// `:method`, `:scheme http`, `:path /`, `:authority service-c:8080`, and `extra` literals.
fn request_block(method: &[u8], extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = match method {
        b"GET" => vec![0x82],
        b"POST" => vec![0x83],
        _ => unreachable!(),
    };
    block.extend_from_slice(&[0x86, 0x84]);
    let authority = b"service-c:8080";
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority);
    for (name, value) in extra {
        block.extend_from_slice(&[0x00, name.len() as u8]);
        block.extend_from_slice(name);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    }
    block
}

fn settings_of(received: &[u8]) -> Vec<(u16, u32)> {
    let (_, _, _, payload) = frames(received)
        .into_iter()
        .find(|(kind, flags, _, _)| *kind == SETTINGS && flags & 1 == 0)
        .expect("the proxy sent its SETTINGS");
    payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

#[tokio::test]
async fn idle_and_half_open_connections_close_at_their_timeouts() {
    let (mesh, _upstream) = service_c(short_limits(), "").await;
    let kinds: [(&str, &[&[u8]]); 4] = [
        ("silent", &[]),
        ("half a head", &[b"GET / HTTP/1.1\r\nHost: service-c\r\n"]),
        ("part of a preface", &[b"PRI * HTTP/2.0\r\n"]),
        (
            "idle after the preface",
            &[H2_PREFACE, &frame(SETTINGS, 0, 0, &[])],
        ),
    ];
    let mut tasks = Vec::new();
    for (kind, sends) in kinds {
        // Before the proxy's clocks start (at accept, at the preface), so none is early.
        let start = Instant::now();
        let mut client = mesh.connect(SERVICE_C).await;
        for bytes in sends {
            client.write_all(bytes).await.unwrap();
        }
        tasks.push(tokio::spawn(async move {
            let (received, closed) = until_closed(&mut client).await;
            (kind, closed - start, received)
        }));
    }
    for task in tasks {
        let (kind, after, received) = task.await.unwrap();
        match kind {
            "idle after the preface" => {
                let goaway = frames(&received).iter().any(|f| f.0 == GOAWAY);
                assert!(goaway, "an idle HTTP/2 connection is told with GOAWAY");
                let latest = IDLE_TIMEOUT + IDLE_CLOSE_GRACE + SLACK;
                closed_in_time(kind, after, IDLE_TIMEOUT, latest);
            }
            _ => closed_in_time(kind, after, HEADER_TIMEOUT, HEADER_TIMEOUT + SLACK),
        }
    }
    assert_eq!(
        mesh.metric(
            "mesh_proxy_limit_hits_total",
            &[("limit", "http_header_timeout")]
        ),
        3.0
    );
    assert_eq!(
        mesh.metric(
            "mesh_proxy_limit_hits_total",
            &[("limit", "http_idle_timeout")]
        ),
        1.0
    );
}

#[tokio::test]
async fn keep_alive_connections_close_once_idle_not_while_a_request_is_in_flight() {
    let (mesh, _upstream) = service_c(short_limits(), "").await;
    // HTTP/2: idle timeout from the end of its last request.
    let mut h2 = mesh.http2(SERVICE_C).await;
    let start = Instant::now();
    for _ in 0..5 {
        // Each request restarts the idle clock: 5 × 400 ms is well past the idle timeout.
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        let answer = h2.send(support::get("service-c:8080", "/")).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert!(start.elapsed() >= 2 * IDLE_TIMEOUT);
    // A request longer than the idle timeout is not cut: the upstream answers after 1.2 s.
    let slow = h2.send(support::get("service-c:8080", "/delay/1200")).await;
    assert_eq!(slow.status, StatusCode::OK);
    // HTTP/1.1: the same.
    let mut h1 = mesh.http1(SERVICE_C).await;
    for _ in 0..3 {
        assert_eq!(h1.get("service-c:8080", "/").await.status, StatusCode::OK);
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
    }
}

#[tokio::test]
async fn a_head_cut_short_after_a_request_closes_at_the_header_timeout() {
    // hyper's own header timer is off (it costs every request a timer): the proxy times a head
    // hyper has begun and not finished from the end of the request before it.
    let (mesh, _upstream) = service_c(short_limits(), "").await;
    let mut client = mesh.connect(SERVICE_C).await;
    let start = Instant::now();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: service-c:8080\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = client.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{:?}",
        &buf[..n]
    );
    let answered = Instant::now();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: serv")
        .await
        .unwrap();
    let (received, closed) = until_closed(&mut client).await;
    assert!(received.is_empty(), "{received:?}");
    // From the request's end, which is between the request's start and its answer.
    assert!(
        closed - start >= HEADER_TIMEOUT && closed - answered <= HEADER_TIMEOUT + SLACK,
        "closed {:?} after the request, {:?} after its answer",
        closed - start,
        closed - answered
    );
    for (limit, hits) in [("http_header_timeout", 1.0), ("http_idle_timeout", 0.0)] {
        assert_eq!(
            mesh.metric("mesh_proxy_limit_hits_total", &[("limit", limit)]),
            hits,
            "{limit}"
        );
    }
}

#[tokio::test]
async fn an_idle_http1_connection_sleeps_wakes_for_its_next_request_and_closes_when_idle() {
    // The proxy puts an idle HTTP/1 connection to sleep after a second (half the header
    // timeout when shorter), giving back hyper's connection and buffers; waiting between
    // requests, it closes at the idle timeout, not the header one.
    let header_timeout = Duration::from_secs(2);
    let idle_timeout = Duration::from_secs(3);
    let limits = Limits {
        http_header_timeout: header_timeout,
        http_idle_timeout: idle_timeout,
        ..short_limits()
    };
    let (mesh, _upstream) = service_c(limits, "").await;
    let mut client = mesh.connect(SERVICE_C).await;
    let request = b"GET / HTTP/1.1\r\nHost: service-c:8080\r\n\r\n";
    let mut buf = [0u8; 4096];
    let mut start = Instant::now();
    for pause in [Duration::from_millis(1500), Duration::ZERO] {
        // Before the request ends, from which the idle clock runs.
        start = Instant::now();
        client.write_all(request).await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{:?}",
            &buf[..n]
        );
        // Asleep after one second: the next request wakes it.
        tokio::time::sleep(pause).await;
    }
    let (received, closed) = until_closed(&mut client).await;
    assert!(received.is_empty(), "{received:?}");
    closed_in_time("asleep", closed - start, idle_timeout, idle_timeout + SLACK);
    for (limit, hits) in [("http_idle_timeout", 1.0), ("http_header_timeout", 0.0)] {
        assert_eq!(
            mesh.metric("mesh_proxy_limit_hits_total", &[("limit", limit)]),
            hits,
            "{limit}"
        );
    }
}

#[tokio::test]
async fn http2_pings_a_client_with_a_stream_open_and_closes_it_when_unanswered() {
    let (mesh, _upstream) = service_c(short_limits(), "").await;
    let mut client = mesh.connect(SERVICE_C).await;
    // Before the last bytes the proxy reads, from which its ping interval runs.
    let start = Instant::now();
    client.write_all(H2_PREFACE).await.unwrap();
    client.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // A POST whose body never comes: a request in flight, so no idle timeout applies.
    let block = request_block(b"POST", &[(b"content-length", b"10")]);
    client
        .write_all(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    let (received, closed) = until_closed(&mut client).await;
    assert!(
        frames(&received).iter().any(|f| f.0 == PING),
        "the proxy pinged"
    );
    // Pinged after the interval, unanswered for the keep-alive timeout: well past the idle
    // timeout, which a request in flight holds off.
    let due = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT;
    closed_in_time("unanswered ping", closed - start, due, due + SLACK);
}

#[tokio::test]
async fn http2_settings_bound_streams_windows_and_header_lists() {
    let (mesh, _upstream) = service_c(short_limits(), "").await;
    let mut client = mesh.connect(SERVICE_C).await;
    client.write_all(H2_PREFACE).await.unwrap();
    client.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let mut received = vec![0u8; 256];
    let n = client.read(&mut received).await.unwrap();
    let settings = settings_of(&received[..n]);
    let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    assert_eq!(get(0x3), Some(100), "MAX_CONCURRENT_STREAMS");
    assert_eq!(get(0x4), Some(64 * 1024), "INITIAL_WINDOW_SIZE");
    assert_eq!(get(0x6), Some(60 * 1024), "MAX_HEADER_LIST_SIZE");
}

#[tokio::test]
async fn a_rapid_reset_flood_gets_goaway_and_reaches_no_upstream() {
    let (mesh, upstream) = service_c(Limits::default(), "").await;
    let mut client = mesh.connect(SERVICE_C).await;
    let mut flood = H2_PREFACE.to_vec();
    flood.extend(frame(SETTINGS, 0, 0, &[]));
    let block = request_block(b"GET", &[]);
    for n in 0..1000u32 {
        let stream = 2 * n + 1;
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
        flood.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    // The proxy may close before it has read it all.
    let _ = client.write_all(&flood).await;
    let (received, _) = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut client))
        .await
        .expect("the proxy closes the flooding connection");
    let goaway = frames(&received)
        .into_iter()
        .find(|f| f.0 == GOAWAY)
        .expect("GOAWAY");
    let code = u32::from_be_bytes(goaway.3[4..8].try_into().unwrap());
    assert_eq!(code, ENHANCE_YOUR_CALM);
    // No amplification: a reset stream is never carried upstream (a few may have started
    // before their reset was read).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        upstream.requests() <= 20,
        "{} upstream requests",
        upstream.requests()
    );
}

#[tokio::test]
async fn a_continuation_flood_is_refused_without_buffering_it() {
    let (mesh, upstream) = service_c(Limits::default(), "").await;
    let mut client = mesh.connect(SERVICE_C).await;
    let mut flood = H2_PREFACE.to_vec();
    flood.extend(frame(SETTINGS, 0, 0, &[]));
    flood.extend(frame(HEADERS, 0, 1, &request_block(b"GET", &[])));
    // CONTINUATION frames of 16 KiB literal headers, never ending (no END_HEADERS).
    let mut literal = vec![0x00, 0x01, b'x', 0x7f];
    // HPACK integer: 127 + 16,000 - 127 in 7-bit groups.
    let mut rest = 16_000 - 127;
    while rest >= 128 {
        literal.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    literal.push(rest as u8);
    literal.extend(std::iter::repeat_n(b'a', 16_000));
    for _ in 0..200 {
        flood.extend(frame(9, 0, 1, &literal));
    }
    let _ = client.write_all(&flood).await;
    let (received, _) = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut client))
        .await
        .expect("the proxy closes the flooding connection");
    let refused = frames(&received)
        .iter()
        .any(|f| f.0 == GOAWAY || (f.0 == HEADERS && f.2 == 1) || f.0 == RST_STREAM);
    assert!(
        refused,
        "the oversized header list is refused: {received:?}"
    );
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn opaque_tcp_closes_after_the_idle_timeout() {
    let echo = echo_server(loopback()).await;
    let (mesh, _upstream) = service_c(short_limits(), "").await;
    let std::net::SocketAddr::V4(echo) = echo else {
        unreachable!()
    };
    let mut client = mesh.connect(echo).await;
    // Before the last byte moves through the proxy, from which its idle clock runs.
    let start = Instant::now();
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).await.unwrap();
    let (_, closed) = until_closed(&mut client).await;
    let latest = TCP_IDLE_TIMEOUT + SLACK;
    closed_in_time("idle TCP", closed - start, TCP_IDLE_TIMEOUT, latest);
    assert_eq!(
        mesh.metric(
            "mesh_proxy_limit_hits_total",
            &[("limit", "tcp_idle_timeout")]
        ),
        1.0
    );
}

/// Whether the proxy closed `client` at once (over a cap) rather than serving it.
async fn refused(client: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connections_over_the_pod_cap_or_the_node_cap_are_closed_and_counted() {
    for (limits, limit) in [
        (
            Limits {
                max_connections_per_pod: 2,
                ..Limits::default()
            },
            "connections_per_pod",
        ),
        (
            Limits {
                max_connections: 2,
                ..Limits::default()
            },
            "connections",
        ),
    ] {
        let (mesh, _upstream) = service_c(limits, "").await;
        let mut first = mesh.http1(SERVICE_C).await;
        let _second = mesh.connect(SERVICE_C).await;
        let mut third = mesh.connect(SERVICE_C).await;
        assert!(refused(&mut third).await, "{limit}: the third is closed");
        assert_eq!(
            mesh.metric("mesh_proxy_limit_hits_total", &[("limit", limit)]),
            1.0
        );
        // The ones it holds still work, and closing one makes room.
        assert_eq!(
            first.get("service-c:8080", "/").await.status,
            StatusCode::OK
        );
        drop(_second);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fourth = mesh.http1(SERVICE_C).await;
        assert_eq!(
            fourth.get("service-c:8080", "/").await.status,
            StatusCode::OK
        );
    }
}

const RETRY_ON_5XX: &str = "\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: service-c
spec:
  hosts:
  - service-c
  http:
  - route:
    - destination:
        host: service-c
    retries:
      attempts: 2
      retryOn: 5xx
";

async fn post(mesh: &Mesh, original: SocketAddrV4, len: usize) -> StatusCode {
    let mut client = mesh.http1(original).await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/")
        .header("host", "service-c:8080")
        .body(Body::new(Bytes::from(vec![b'x'; len])))
        .unwrap();
    client.send(request).await.status
}

#[tokio::test]
async fn bodies_over_the_buffer_budgets_are_streamed_once_not_retried() {
    // Within budget: buffered, so the 503 is retried twice.
    let (mesh, upstream) = service_c(Limits::default(), RETRY_ON_5XX).await;
    upstream.fail_with(503);
    assert_eq!(
        post(&mesh, SERVICE_C, 2000).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(upstream.requests(), 3);

    for (limits, limit) in [
        (
            Limits {
                body_buffer_per_connection: 1000,
                ..Limits::default()
            },
            "body_buffer_connection",
        ),
        (
            Limits {
                body_buffer_global: 1000,
                ..Limits::default()
            },
            "body_buffer_global",
        ),
    ] {
        let (mesh, upstream) = service_c(limits, RETRY_ON_5XX).await;
        upstream.fail_with(503);
        assert_eq!(
            post(&mesh, SERVICE_C, 2000).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            upstream.requests(),
            1,
            "{limit}: streamed once, not retried"
        );
        assert_eq!(
            mesh.metric("mesh_proxy_limit_hits_total", &[("limit", limit)]),
            1.0
        );
        // A body within the budget is still buffered and retried, and the budget came back.
        assert_eq!(
            post(&mesh, SERVICE_C, 500).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            post(&mesh, SERVICE_C, 500).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(upstream.requests(), 7);
    }
}

#[tokio::test]
async fn mirrored_copies_over_the_node_cap_are_dropped_and_counted() {
    let shadow_ip = loopback();
    let shadow = Upstream::start(shadow_ip, "shadow").await;
    let shadow_vip = std::net::Ipv4Addr::new(10, 96, 0, 61);
    let mut rules = service(
        "shadow",
        shadow_vip,
        8080,
        "http",
        &[Backend {
            pod: "shadow-0",
            ip: shadow_ip,
            labels: &[("app", "shadow")],
        }],
    );
    rules.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: service-c, namespace: default}\n\
         spec:\n  hosts: [service-c]\n  http:\n\
         \x20 - route: [{destination: {host: service-c}}]\n\
         \x20   mirror: {host: shadow}\n",
    );
    let limits = Limits {
        max_mirrors_in_flight: 1,
        ..Limits::default()
    };
    let (mesh, upstream) = service_c(limits, &rules).await;
    // The first copy is in flight at the shadow for a second; the two after it find the node's
    // one slot taken.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(mesh.http1(SERVICE_C).await);
    }
    let mut first = clients.remove(0);
    let held = tokio::spawn(async move { first.get("service-c:8080", "/delay/1000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for mut client in clients {
        assert_eq!(
            client.get("service-c:8080", "/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(upstream.requests(), 3);
    assert_eq!(shadow.requests(), 1);
    let dropped = mesh.metric("mesh_engine_events_total", &[("event", "mirror_dropped")]);
    assert_eq!(dropped, 2.0);
}
