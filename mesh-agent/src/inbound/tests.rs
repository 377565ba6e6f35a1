//! The destination's judgement end to end in one process: a client on one end of an in-memory
//! stream, this module on the other, and a real app on loopback that echoes what it received.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    net::TcpListener,
};

use super::*;
use crate::{
    authorization::Authorization,
    config,
    identity::{spiffe::SpiffeId, WorkloadIdentity},
    proxy::http::activity::IDLE_CLOSE_GRACE,
    redirect::Exemption,
    telemetry::metrics::{Reporter, Security},
};
use tokio::sync::watch;

/// One end of an in-memory connection; a reset closes it.
struct Pipe(DuplexStream);

impl AsyncRead for Pipe {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Pipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl Resettable for Pipe {
    fn reset(&mut self) {
        // Dropping our end is what the client can observe: end of file.
        let (replacement, _) = tokio::io::duplex(1);
        self.0 = replacement;
    }
}

/// An app that answers every request with `<method> <path> xfcc=<header>`, and counts the
/// connections it accepted.
async fn echo_app() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    app(true).await
}

/// [`echo_app`], closing each connection after one answer unless `keep_alive`.
async fn app(keep_alive: bool) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let service = service_fn(
                |request: ::http::Request<hyper::body::Incoming>| async move {
                    let xfcc = request
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let text = format!("{} {} xfcc={xfcc}", request.method(), request.uri());
                    Ok::<_, std::convert::Infallible>(::http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(text)),
                    ))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (address, accepted)
}

const POLICY: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-from-a, namespace: default}
spec:
  rules:
  - from: [{source: {principals: ['cluster.local/ns/default/sa/service-a']}}]
    to: [{operation: {methods: [GET]}}]
";

/// `policies`, fixed: no change will come.
fn fixed(policies: Policies) -> Arc<PodPolicies> {
    let (_, changes) = watch::channel(Arc::new(Authorization::default()));
    Arc::new(PodPolicies::new(changes, move || policies.clone()))
}

fn policies(yaml: &str) -> Policies {
    let loaded = config::load_str("policy.yml", yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    Authorization::new(&loaded.config.authorization_policies)
        .for_workload("default", &BTreeMap::new())
}

fn arrival(account: &str, destination: SocketAddr) -> Arc<Arrival> {
    let id = |account: &str| {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{account}")).unwrap()
    };
    Arc::new(Arrival {
        client: Some(id(account)),
        server: Some(id("service-b")),
        source: "10.0.0.1".parse().unwrap(),
        destination,
        labels: labels(&metrics()),
    })
}

/// The labels of a destination's report, in `metrics`.
fn labels(metrics: &Metrics) -> Arc<PeerLabels> {
    let workload =
        |name: &str| WorkloadIdentity::from_pod_labels(name, "default", &BTreeMap::new());
    metrics.secured_peer_labels(
        &workload("service-a"),
        None,
        Some(&workload("service-b")),
        Security {
            reporter: Reporter::Destination,
            principals: None,
        },
    )
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new("cluster.local", &mut Registry::default()))
}

/// Judges the connection whose far end is `server` under `policies`, which inspect it (they
/// read HTTP or deny it as a connection), in a task of its own; its app is on loopback at
/// `arrival.destination`.
fn spawn_inspect(
    server: DuplexStream,
    policies: Policies,
    arrival: Arc<Arrival>,
) -> tokio::task::JoinHandle<()> {
    let app = loopback_app(arrival.destination);
    spawn_inspect_for(server, policies, arrival, app)
}

fn spawn_inspect_for(
    server: DuplexStream,
    policies: Policies,
    arrival: Arc<Arrival>,
    app: App,
) -> tokio::task::JoinHandle<()> {
    let Admission::Inspect(decision) = admit(&policies, &arrival) else {
        panic!("inspected");
    };
    tokio::spawn(async move {
        let policies = fixed(policies);
        inspect(Pipe(server), decision, policies, arrival, app, &metrics()).await;
    })
}

/// Sends `requests` (raw HTTP/1) on one connection judged for `account`; returns what came
/// back once the connection ended.
async fn exchange(account: &str, requests: &str, yaml: &str) -> (String, usize) {
    exchange_with(echo_app().await, account, requests, yaml).await
}

async fn exchange_with(
    (address, accepted): (SocketAddr, Arc<std::sync::atomic::AtomicUsize>),
    account: &str,
    requests: &str,
    yaml: &str,
) -> (String, usize) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let judged = spawn_inspect(server, policies(yaml), arrival(account, address));
    client.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    judged.await.unwrap();
    (answer, accepted.load(std::sync::atomic::Ordering::SeqCst))
}

#[tokio::test]
async fn requests_are_judged_one_by_one_and_forwarded_with_the_proven_identity() {
    let (answer, accepted) = exchange(
        "service-a",
        "GET /a/../b?x=1 HTTP/1.1\r\nHost: b\r\nx-forwarded-client-cert: URI=spiffe://forged\r\n\r\n\
         POST / HTTP/1.1\r\nHost: b\r\ncontent-length: 0\r\n\r\n\
         GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
        POLICY,
    )
    .await;
    // The echoed bodies end without a line break: statuses are found by their prefix.
    let statuses: Vec<&str> = answer
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|rest| &rest[..3])
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{answer}");
    assert!(answer.contains("RBAC: access denied"), "{answer}");
    assert!(
        answer.contains(
            "GET /b?x=1 xfcc=By=spiffe://cluster.local/ns/default/sa/service-b;\
             URI=spiffe://cluster.local/ns/default/sa/service-a"
        ),
        "the path as judged, the identity as proven: {answer}"
    );
    assert!(!answer.contains("forged"), "{answer}");
    assert_eq!(
        accepted, 1,
        "one app connection for the client's connection"
    );
}

#[tokio::test]
async fn an_app_that_closes_its_connections_is_dialled_again_for_the_next_request() {
    let get = "GET / HTTP/1.1\r\nHost: b\r\n\r\n";
    let last = "GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n";
    let (answer, accepted) = exchange_with(
        app(false).await,
        "service-a",
        &format!("{get}{get}{last}"),
        POLICY,
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 3, "{answer}");
    assert_eq!(accepted, 3);
}

#[tokio::test(start_paused = true)]
async fn a_head_that_never_ends_is_given_up_after_the_header_timeout() {
    let (address, accepted) = echo_app().await;
    let (mut client, server) = tokio::io::duplex(1024);
    let judged = spawn_inspect(server, policies(POLICY), arrival("service-a", address));
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: b\r\n")
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= http::HEADER_TIMEOUT && waited < http::HEADER_TIMEOUT + Duration::from_secs(1),
        "given up after {waited:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    judged.await.unwrap();
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// An HTTP/2 client that sends its preface and settings, then nothing (it answers no ping),
/// to a connection served under `limits`: when the agent closed it, and the types of the
/// frames it was sent.
async fn idle_h2_client(limits: InboundLimits) -> (Duration, Vec<u8>) {
    let (address, _) = echo_app().await;
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let mut app = loopback_app(address);
    app.limits = limits;
    let served = spawn_inspect_for(server, policies(POLICY), arrival("service-a", address), app);
    client
        .write_all(crate::proxy::http::H2_PREFACE)
        .await
        .unwrap();
    client
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let mut sent = Vec::new();
    client.read_to_end(&mut sent).await.unwrap();
    let closed_after = start.elapsed();
    served.await.unwrap();
    let mut types = Vec::new();
    let mut rest = &sent[..];
    while rest.len() >= 9 {
        let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        types.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    (closed_after, types)
}

const GOAWAY: u8 = 7;
const PING: u8 = 6;

#[tokio::test(start_paused = true)]
async fn an_idle_http2_connection_is_sent_goaway_at_the_idle_timeout_and_closed() {
    let idle = Duration::from_secs(30);
    let (closed_after, types) = idle_h2_client(InboundLimits {
        http_idle_timeout: idle,
        h2_keepalive_interval: Duration::from_secs(3600),
        ..InboundLimits::default()
    })
    .await;
    // GOAWAY, then a second for the client to take it (this one never answers).
    assert!(
        closed_after >= idle
            && closed_after <= idle + IDLE_CLOSE_GRACE + Duration::from_millis(100),
        "closed after {closed_after:?}"
    );
    assert!(types.contains(&GOAWAY), "frames sent: {types:?}");
}

#[tokio::test(start_paused = true)]
async fn an_http2_client_that_answers_no_ping_is_closed_after_the_keepalive_timeout() {
    let (interval, timeout) = (Duration::from_secs(10), Duration::from_secs(5));
    let (closed_after, types) = idle_h2_client(InboundLimits {
        http_idle_timeout: Duration::from_secs(3600),
        h2_keepalive_interval: interval,
        h2_keepalive_timeout: timeout,
        ..InboundLimits::default()
    })
    .await;
    assert!(
        closed_after >= interval + timeout
            && closed_after <= interval + timeout + Duration::from_secs(1),
        "closed after {closed_after:?}"
    );
    assert!(types.contains(&PING), "frames sent: {types:?}");
}

#[tokio::test]
async fn a_client_denied_everything_never_reaches_the_app() {
    let (answer, accepted) = exchange(
        "intruder",
        "GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
        POLICY,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden"), "{answer}");
    assert_eq!(accepted, 0);
}

#[tokio::test]
async fn a_connection_that_is_not_http_is_judged_as_a_connection() {
    let (answer, accepted) = exchange("service-a", "\x16\x03\x01 not http at all", POLICY).await;
    // The ALLOW rule reads methods, which a TLS client does not have: it cannot match, and the
    // connection is reset without reaching the app.
    assert_eq!(answer, "");
    assert_eq!(accepted, 0);
}

fn loopback_app(address: SocketAddr) -> App {
    App {
        dialer: Dialer::new(None, Exemption::default()),
        address,
        limits: InboundLimits {
            connect_timeout: Duration::from_secs(5),
            ..InboundLimits::default()
        },
    }
}

#[tokio::test]
async fn a_silent_client_is_judged_as_a_connection_once_detection_gives_up() {
    let (address, accepted) = echo_app().await;
    let (mut client, server) = tokio::io::duplex(1024);
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin*']}}]}]
",
    );
    let arrival = arrival("service-a", address);
    // The DENY rule's paths are unknown on a connection: it matches (fails closed).
    let Admission::Inspect(decision) = admit(&policies, &arrival) else {
        panic!("inspected");
    };
    assert!(!decision.allowed);
    let start = tokio::time::Instant::now();
    let app = loopback_app(address);
    inspect(
        Pipe(server),
        decision,
        fixed(policies),
        arrival,
        app,
        &metrics(),
    )
    .await;
    assert!(start.elapsed() >= DETECT_TIMEOUT);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_connection_allowed_as_such_reaches_the_app_with_its_first_bytes() {
    let address = byte_app(b"").await;
    let (mut client, server) = tokio::io::duplex(1024);
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-or-reads}
spec:
  rules:
  - from: [{source: {principals: ['cluster.local/ns/default/sa/service-a']}}]
  - to: [{operation: {methods: [GET]}}]
",
    );
    let arrival = arrival("service-a", address);
    assert!(matches!(
        admit(&policies, &arrival),
        Admission::Inspect(Decision { allowed: true, .. })
    ));
    client.write_all(b"\x16\x03\x01 a TLS hello").await.unwrap();
    spawn_inspect(server, policies, arrival);
    let mut echoed = [0; 15];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"\x16\x03\x01 a TLS hello");
}

/// An app that writes `greeting` to each connection it accepts (a server-first protocol when
/// not empty), then echoes what it reads.
async fn byte_app(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(greeting).await?;
                let (mut read, mut write) = stream.split();
                tokio::io::copy(&mut read, &mut write).await
            });
        }
    });
    address
}

/// Delivers one connection with no policy in force, as a tunnel or the plaintext listener does.
async fn deliver_open(
    server: DuplexStream,
    address: SocketAddr,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    let arrival = arrival("service-a", address);
    let policies = Policies::default();
    assert!(matches!(admit(&policies, &arrival), Admission::Open));
    let dialled = TcpStream::connect(address).await.unwrap();
    tokio::spawn(async move {
        let app = loopback_app(address);
        deliver(
            Pipe(server),
            dialled,
            app,
            fixed(policies),
            arrival,
            &metrics,
        )
        .await;
    })
}

#[tokio::test]
async fn with_no_policy_http_is_served_so_that_the_destination_reports_each_request() {
    let (address, accepted) = echo_app().await;
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new("cluster.local", &mut registry));
    let delivered = deliver_open(server, address, Arc::clone(&metrics)).await;
    client
        .write_all(
            b"GET /one HTTP/1.1\r\nHost: b\r\nx-forwarded-client-cert: URI=spiffe://forged\r\n\r\n\
              GET /two HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    delivered.await.unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert!(!answer.contains("forged"), "{answer}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let reported = text
        .lines()
        .find(|line| line.starts_with("istio_requests_total{"))
        .unwrap_or_else(|| panic!("no request reported:\n{text}"));
    assert!(reported.contains(r#"reporter="destination""#), "{reported}");
    assert!(reported.contains(r#"response_code="200""#), "{reported}");
    assert!(reported.ends_with(" 2"), "{reported}");
}

#[tokio::test(start_paused = true)]
async fn with_no_policy_an_app_that_speaks_first_is_carried_without_waiting_for_detection() {
    let address = byte_app(b"220 ready\r\n").await;
    let (mut client, server) = tokio::io::duplex(1024);
    let arrival = arrival("service-a", address);
    let dialled = TcpStream::connect(address).await.unwrap();
    // The greeting is there before delivery starts; the client has said nothing.
    dialled.readable().await.unwrap();
    let start = tokio::time::Instant::now();
    tokio::spawn(async move {
        let app = loopback_app(address);
        let policies = fixed(Policies::default());
        deliver(Pipe(server), dialled, app, policies, arrival, &metrics()).await;
    });
    let mut greeting = [0; 11];
    client.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    assert!(start.elapsed() < DETECT_TIMEOUT, "{:?}", start.elapsed());
    // Carried as bytes from then on: what looks like HTTP is not served but echoed.
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut echoed = [0; 18];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"GET / HTTP/1.1\r\n\r\n");
}

#[tokio::test]
async fn a_websocket_upgrade_reaches_the_app_and_its_bytes_are_carried_after_the_switch() {
    let address = websocket_app().await;
    let (mut client, server) = tokio::io::duplex(1024);
    let _delivered = deliver_open(server, address, metrics()).await;
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        client.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    client.write_all(b"frames after the switch").await.unwrap();
    let mut echoed = [0; 23];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"frames after the switch");
}

/// An app that switches every request that asks for it to an echo of raw bytes.
async fn websocket_app() -> SocketAddr {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(
                |mut request: ::http::Request<hyper::body::Incoming>| async move {
                    let asked = request.headers().get("upgrade").cloned();
                    let mut response =
                        ::http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    if let Some(protocol) = asked {
                        let upgraded = hyper::upgrade::on(&mut request);
                        tokio::spawn(async move {
                            let upgraded = upgraded.await.unwrap();
                            let (mut read, mut write) =
                                tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                            tokio::io::copy(&mut read, &mut write).await
                        });
                        *response.status_mut() = ::http::StatusCode::SWITCHING_PROTOCOLS;
                        response.headers_mut().insert("upgrade", protocol);
                        response
                            .headers_mut()
                            .insert("connection", ::http::HeaderValue::from_static("upgrade"));
                    }
                    Ok::<_, std::convert::Infallible>(response)
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    address
}

#[test]
fn no_policy_or_an_allowed_connection_without_http_rules_is_carried_as_bytes() {
    let address: SocketAddr = "10.0.0.2:5432".parse().unwrap();
    assert!(matches!(
        admit(&Policies::default(), &arrival("anyone", address)),
        Admission::Open
    ));
    let from_a = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-a}
spec: {rules: [{from: [{source: {principals: ['cluster.local/ns/default/sa/service-a']}}]}]}
",
    );
    assert!(matches!(
        admit(&from_a, &arrival("service-a", address)),
        Admission::Open
    ));
    assert!(matches!(
        admit(&from_a, &arrival("intruder", address)),
        Admission::Inspect(Decision { allowed: false, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_connection_carried_as_bytes_ends_after_the_tcp_idle_timeout_without_a_byte() {
    let (address, _) = echo_app().await;
    let (_client, server) = tokio::io::duplex(1024);
    let mut app = tokio::net::TcpStream::connect(address).await.unwrap();
    let arrival = arrival("anyone", address);
    let policies = fixed(Policies::default());
    let idle = Duration::from_secs(30);
    let start = tokio::time::Instant::now();
    let mut server = Pipe(server);
    let ended =
        carry_while_admitted(&mut server, &mut app, idle, &policies, &arrival, &metrics()).await;
    assert_eq!(start.elapsed(), idle);
    let error = ended.expect("ended by itself, not reset").unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn a_connection_carried_is_reset_when_new_policies_no_longer_admit_it() {
    let (address, _) = echo_app().await;
    let (mut client, server) = tokio::io::duplex(1024);
    let mut app = tokio::net::TcpStream::connect(address).await.unwrap();
    let arrival = arrival("intruder", address);
    let in_force = Arc::new(std::sync::Mutex::new(Policies::default()));
    let (changed, changes) = watch::channel(Arc::new(Authorization::default()));
    let lookup = Arc::clone(&in_force);
    let policies = PodPolicies::new(changes, move || lookup.lock().unwrap().clone());
    let carried = tokio::spawn(async move {
        let mut server = Pipe(server);
        let idle = Duration::from_secs(3600);
        carry_while_admitted(&mut server, &mut app, idle, &policies, &arrival, &metrics()).await
    });
    // Carried while no policy applies: an HTTP request through it is answered.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0; 12];
    client.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // A policy that admits only service-a comes into force.
    *in_force.lock().unwrap() = self::policies(POLICY);
    changed.send(Arc::new(Authorization::default())).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), carried)
        .await
        .expect("reset at once")
        .unwrap();
    assert!(ended.is_none(), "reset, not ended by itself: {ended:?}");
}
