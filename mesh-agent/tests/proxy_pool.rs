//! The upstream pool in process: a `DestinationRule`'s `connectionPool` enforced on real
//! upstream connections (each test upstream counts the connections it accepts), with Envoy's
//! semantics — `maxConnections`, `http1MaxPendingRequests` (`UO` past it),
//! `maxRequestsPerConnection`, `connectTimeout` (`UF`), `http.idleTimeout` and
//! `tcp.idleTimeout`. The timeouts run on tokio's paused clock.

mod support;

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http2, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use support::{loopback, service, Answer, Backend, Body, Mesh, Options, UPSTREAM_PORT};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch, Notify},
    time::Instant,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(VIP, 8080);
const SERVICE_HOST: &str = "pool.default.svc.cluster.local";

/// An HTTP/1.1 + h2c upstream that counts its connections: accepted, open now, most open at
/// once, and requests per connection. Requests to `/held` wait until [`Counted::release`].
struct Counted {
    ip: Ipv4Addr,
    state: Arc<Counts>,
    gate: watch::Sender<bool>,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    /// Requests served, per connection in the order accepted.
    per_connection: Mutex<Vec<usize>>,
    held: AtomicUsize,
    arrived: Notify,
    closed: Notify,
}

impl Counted {
    async fn start() -> Counted {
        let ip = loopback();
        let listener = TcpListener::bind((ip, UPSTREAM_PORT)).await.expect("bind");
        let state = Arc::new(Counts::default());
        let (gate, opened) = watch::channel(false);
        let counts = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = counts.accepted.fetch_add(1, Ordering::SeqCst);
                counts.per_connection.lock().unwrap().push(0);
                let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                counts.max_open.fetch_max(open, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                let opened = opened.clone();
                tokio::spawn(async move {
                    let served = Arc::clone(&counts);
                    let service = service_fn(move |request: Request<Incoming>| {
                        let counts = Arc::clone(&served);
                        let mut opened = opened.clone();
                        async move {
                            counts.per_connection.lock().unwrap()[index] += 1;
                            if request.uri().path() == "/held" {
                                counts.held.fetch_add(1, Ordering::SeqCst);
                                counts.arrived.notify_waiters();
                                let _ = opened.wait_for(|open| *open).await;
                            }
                            let _ = request.into_body().collect().await;
                            let body = Full::new(Bytes::from(format!("connection {index}")));
                            Ok::<_, Infallible>(Response::new(body))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                    counts.closed.notify_waiters();
                });
            }
        });
        Counted { ip, state, gate }
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    fn max_open(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    fn per_connection(&self) -> Vec<usize> {
        self.state.per_connection.lock().unwrap().clone()
    }

    /// Waits until `count` requests wait at `/held`.
    async fn held(&self, count: usize) {
        loop {
            let arrived = self.state.arrived.notified();
            if self.state.held.load(Ordering::SeqCst) >= count {
                return;
            }
            arrived.await;
        }
    }

    /// Waits until no connection is open.
    async fn all_closed(&self) {
        loop {
            let closed = self.state.closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Lets every held request (and any later one) through.
    fn release(&self) {
        self.gate.send_replace(true);
    }
}

/// The `pool` service (one endpoint: `upstream`) with `rules` (a DestinationRule's
/// `trafficPolicy`, a VirtualService...).
async fn mesh(upstream: &Counted, port_name: &str, rules: &str) -> Mesh {
    let backends = [Backend {
        pod: "pool-0",
        ip: upstream.ip,
        labels: &[("app", "pool")],
    }];
    let mut yaml = service("pool", VIP, 8080, port_name, &backends);
    yaml.push_str("---\n");
    yaml.push_str(rules);
    let options = Options {
        access_log: true,
        ..Options::default()
    };
    Mesh::with(&yaml, options).await
}

/// A DestinationRule for `pool` with `connection_pool` (YAML flow mappings, `tcp` and `http`).
fn pool_rule(connection_pool: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: pool, namespace: default}}\n\
         spec:\n  host: pool\n  trafficPolicy:\n    connectionPool: {connection_pool}\n"
    )
}

/// `GET path` on a connection of its own.
async fn get_alone(mesh: &Mesh, path: &str) -> Answer {
    mesh.http1(SERVICE).await.get("pool", path).await
}

fn flags(answer: &Answer) -> &str {
    answer
        .headers
        .get("x-mesh-response-flags")
        .map_or("-", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_one_carries_concurrent_requests_on_one_upstream_connection() {
    let upstream = Counted::start().await;
    let mesh = mesh(&upstream, "http", &pool_rule("{tcp: {maxConnections: 1}}")).await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    for _ in 0..8 {
        let mut client = mesh.http1(SERVICE).await;
        let answers = answers.clone();
        tokio::spawn(async move {
            let _ = answers.send(client.get("pool", "/held").await);
        });
    }
    upstream.held(1).await;
    // Without the limit, every request would reach the upstream on a connection of its own.
    let more = tokio::time::timeout(Duration::from_millis(300), upstream.held(2)).await;
    assert!(more.is_err(), "a second request reached the upstream");
    upstream.release();
    for _ in 0..8 {
        let answer = answered.recv().await.expect("an answer");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.text(), "connection 0");
    }
    assert_eq!((upstream.accepted(), upstream.max_open()), (1, 1));
    assert_eq!(upstream.per_connection(), [8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_pending_requests_the_excess_gets_503_uo_at_once() {
    let upstream = Counted::start().await;
    let rule = pool_rule("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}");
    let mesh = mesh(&upstream, "http", &rule).await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let send = |answers: mpsc::UnboundedSender<Answer>| {
        let mesh = &mesh;
        async move {
            let mut client = mesh.http1(SERVICE).await;
            tokio::spawn(async move {
                let _ = answers.send(client.get("pool", "/held").await);
            });
        }
    };
    // One request on the only connection, held there...
    send(answers.clone()).await;
    upstream.held(1).await;
    // ...one pending, and three refused while those two wait.
    for _ in 0..4 {
        send(answers.clone()).await;
    }
    for _ in 0..3 {
        let refused = tokio::time::timeout(Duration::from_secs(5), answered.recv())
            .await
            .expect("refused before the held request is answered")
            .expect("an answer");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(flags(&refused), "UO");
        assert!(refused.text().contains("overflow"), "{}", refused.text());
    }
    upstream.release();
    for _ in 0..2 {
        let answer = answered.recv().await.expect("an answer");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    assert_eq!(upstream.accepted(), 1);
    let uo = [
        ("response_flags", "UO"),
        ("response_code", "503"),
        ("destination_service", SERVICE_HOST),
    ];
    assert_eq!(mesh.metric("istio_requests_total", &uo), 3.0);
    let service = [("destination_service", SERVICE_HOST)];
    assert_eq!(mesh.metric("mesh_pool_overflows_total", &service), 3.0);
    let lines = mesh.access_log(5).await;
    let refused = lines.iter().filter(|l| l["response_flags"] == "UO").count();
    assert_eq!(refused, 3, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_whose_client_goes_away_gives_its_slot_back() {
    let upstream = Counted::start().await;
    let rule = pool_rule("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}");
    let mesh = mesh(&upstream, "http", &rule).await;
    let mut first = mesh.http1(SERVICE).await;
    let held = tokio::spawn(async move { first.get("pool", "/held").await });
    upstream.held(1).await;
    // Two more: whichever comes first takes the one pending slot, the other is refused.
    let request = b"GET /held HTTP/1.1\r\nhost: pool\r\n\r\n";
    let mut second = mesh.connect(SERVICE).await;
    second.write_all(request).await.expect("write");
    let mut third = mesh.connect(SERVICE).await;
    third.write_all(request).await.expect("write");
    let (mut head2, mut head3) = ([0; 12], [0; 12]);
    let first_answer = async {
        tokio::select! {
            read = second.read_exact(&mut head2) => {
                read.expect("an answer");
                true
            }
            read = third.read_exact(&mut head3) => {
                read.expect("an answer");
                false
            }
        }
    };
    let second_refused = tokio::time::timeout(Duration::from_secs(5), first_answer)
        .await
        .expect("one of the two refused at once");
    let (refused, pending) = match second_refused {
        true => (head2, third),
        false => (head3, second),
    };
    assert_eq!(&refused, b"HTTP/1.1 503");
    // The pending one's client goes away: its slot comes back...
    drop(pending);
    eventually(|| mesh.metric("istio_requests_total", &[("response_flags", "DC")]) == 1.0).await;
    // ...so the next request waits instead of being refused.
    let mut fourth = mesh.http1(SERVICE).await;
    let mut waiting = tokio::spawn(async move { fourth.get("pool", "/held").await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
    assert!(
        early.is_err(),
        "answered while the connection was busy: {early:?}"
    );
    upstream.release();
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(waiting.await.unwrap().status, StatusCode::OK);
    assert_eq!(upstream.accepted(), 1);
}

/// Waits (at most 10 s) until `condition` holds.
async fn eventually(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "not in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_opens_a_new_upstream_connection_after_n() {
    let upstream = Counted::start().await;
    let rule = pool_rule("{http: {maxRequestsPerConnection: 3}}");
    let mesh = mesh(&upstream, "http", &rule).await;
    let mut client = mesh.http1(SERVICE).await;
    for _ in 0..7 {
        let answer = client.get("pool", "/").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    assert_eq!(upstream.per_connection(), [3, 3, 1]);
    // The spent ones are closed.
    eventually(|| upstream.open() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_share_one_connection_until_max_requests_per_connection() {
    let upstream = Counted::start().await;
    let rule = pool_rule("{tcp: {maxConnections: 1}, http: {maxRequestsPerConnection: 4}}");
    let mesh = mesh(&upstream, "http2", &rule).await;
    let stream = mesh.connect(SERVICE).await;
    let (h2, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let (answers, mut answered) = mpsc::unbounded_channel();
    for _ in 0..3 {
        let mut h2 = h2.clone();
        let answers = answers.clone();
        tokio::spawn(async move {
            let _ = answers.send(h2_get(&mut h2, "/held").await);
        });
    }
    // Multiplexed: all three are at the upstream at once, on one connection.
    upstream.held(3).await;
    upstream.release();
    for _ in 0..3 {
        assert_eq!(answered.recv().await.unwrap(), StatusCode::OK);
    }
    let mut h2 = h2.clone();
    for _ in 0..5 {
        assert_eq!(h2_get(&mut h2, "/").await, StatusCode::OK);
    }
    assert_eq!(upstream.per_connection(), [4, 4]);
}

/// `GET path` over HTTP/2; the status, once the body is read.
async fn h2_get(h2: &mut http2::SendRequest<Body>, path: &str) -> StatusCode {
    let request = Request::get(format!("http://pool:8080{path}"))
        .version(Version::HTTP_2)
        .body(Body::default())
        .expect("request");
    h2.ready().await.expect("connection open");
    let response = h2.send_request(request).await.expect("response");
    let status = response.status();
    response.into_body().collect().await.expect("body");
    status
}

/// A listener on `ip` whose accept queue is full, so the kernel drops every further SYN: a
/// connect to it never completes (nor fails) until the client gives up. Local and without
/// privileges, unlike a blackholed route; returned with the connections that fill it.
async fn never_answering(ip: Ipv4Addr) -> (std::net::TcpListener, Vec<TcpStream>) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let addr = SocketAddr::from((ip, UPSTREAM_PORT));
    socket.bind(&addr.into()).expect("bind");
    // Backlog 0: Linux queues one connection, then drops SYNs while it stays unaccepted.
    socket.listen(0).expect("listen");
    let mut queued = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(stream) => queued.push(stream.expect("a queued connection")),
            Err(_) => return (socket.into(), queued),
        }
        assert!(queued.len() < 16, "the accept queue never filled");
    }
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_ends_a_try_to_an_endpoint_that_never_answers_with_503_uf() {
    let ip = loopback();
    let _silent = never_answering(ip).await;
    let yaml = service(
        "pool",
        VIP,
        8080,
        "http",
        &[Backend {
            pod: "pool-0",
            ip,
            labels: &[("app", "pool")],
        }],
    );
    let rules = format!(
        "{}---\n{}",
        pool_rule("{tcp: {connectTimeout: 250ms}}"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: pool, namespace: default}\n\
         spec:\n  hosts: [pool]\n  http:\n\
         \x20 - match: [{uri: {prefix: /once}}]\n\
         \x20   retries: {attempts: 0}\n\
         \x20   route: [{destination: {host: pool}}]\n\
         \x20 - route: [{destination: {host: pool}}]\n"
    );
    let mesh = Mesh::start(&format!("{yaml}---\n{rules}")).await;

    let started = Instant::now();
    let once = get_alone(&mesh, "/once").await;
    let took = started.elapsed();
    assert_eq!(once.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flags(&once), "UF");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(300),
        "took {took:?}"
    );

    // Istio's default policy retries connect failures twice: three dials, then `URX`.
    let started = Instant::now();
    let retried = get_alone(&mesh, "/").await;
    let took = started.elapsed();
    assert_eq!(retried.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flags(&retried), "UF,URX");
    assert!(
        took >= Duration::from_millis(750) && took < Duration::from_secs(1),
        "took {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn http_idle_timeout_closes_idle_upstream_connections() {
    let upstream = Counted::start().await;
    let mesh = mesh(&upstream, "http", &pool_rule("{http: {idleTimeout: 30s}}")).await;
    assert_eq!(get_alone(&mesh, "/").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(upstream.open(), 1, "closed before its idle timeout");
    // Used again: idle from now on.
    assert_eq!(get_alone(&mesh, "/").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(upstream.open(), 1, "closed before its idle timeout");
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::timeout(Duration::from_secs(1), upstream.all_closed())
        .await
        .expect("the idle connection is closed");
    assert_eq!(get_alone(&mesh, "/").await.status, StatusCode::OK);
    assert_eq!(upstream.per_connection(), [2, 1]);
}

#[tokio::test(start_paused = true)]
async fn tcp_idle_timeout_closes_both_sides_of_an_idle_connection() {
    let ip = loopback();
    let listener = TcpListener::bind((ip, UPSTREAM_PORT)).await.expect("bind");
    let (upstream_closed, mut closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let upstream_closed = upstream_closed.clone();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = upstream_closed.send(());
            });
        }
    });
    let yaml = service(
        "echo",
        VIP,
        8080,
        "tcp-echo",
        &[Backend {
            pod: "echo-0",
            ip,
            labels: &[("app", "echo")],
        }],
    );
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
                metadata: {name: echo, namespace: default}\n\
                spec:\n  host: echo\n  trafficPolicy:\n    connectionPool: {tcp: {idleTimeout: 5s}}\n";
    let mesh = Mesh::start(&format!("{yaml}---\n{rule}")).await;
    let mut client = mesh.connect(SERVICE).await;
    let mut echoed = [0; 4];
    for pause in [0, 4, 4] {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        client.write_all(b"ping").await.expect("write");
        client.read_exact(&mut echoed).await.expect("echoed");
    }
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "closed by the proxy: {read:?}");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_secs(5) && idle < Duration::from_secs(6),
        "{idle:?}"
    );
    tokio::time::timeout(Duration::from_secs(1), closed.recv())
        .await
        .expect("the upstream side is closed too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_limits_and_keeps_the_counts() {
    let upstream = Counted::start().await;
    let rule = pool_rule("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}");
    let mesh = mesh(&upstream, "http", &rule).await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let send = |answers: mpsc::UnboundedSender<Answer>| {
        let mesh = &mesh;
        async move {
            let mut client = mesh.http1(SERVICE).await;
            tokio::spawn(async move {
                let _ = answers.send(client.get("pool", "/held").await);
            });
        }
    };
    send(answers.clone()).await;
    upstream.held(1).await;
    // More pending requests allowed; the connection opened before still counts.
    mesh.apply(&pool_rule(
        "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 3}}",
    ));
    for _ in 0..4 {
        send(answers.clone()).await;
    }
    let refused = tokio::time::timeout(Duration::from_secs(5), answered.recv())
        .await
        .expect("one refused at once")
        .expect("an answer");
    assert_eq!(flags(&refused), "UO");
    upstream.release();
    for _ in 0..4 {
        assert_eq!(answered.recv().await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_copy_never_waits_for_a_connection() {
    let primary = Counted::start().await;
    let shadow = Counted::start().await;
    let shadow_vip = Ipv4Addr::new(10, 96, 0, 61);
    let mut yaml = service(
        "shadow",
        shadow_vip,
        8080,
        "http",
        &[Backend {
            pod: "shadow-0",
            ip: shadow.ip,
            labels: &[("app", "shadow")],
        }],
    );
    yaml.push_str("---\n");
    yaml.push_str(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: shadow, namespace: default}\n\
         spec:\n  host: shadow\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: pool, namespace: default}\n\
         spec:\n  hosts: [pool]\n  http:\n\
         \x20 - route: [{destination: {host: pool}}]\n\
         \x20   mirror: {host: shadow}\n",
    );
    let mesh = mesh(&primary, "http", &yaml).await;
    primary.release();
    // The first copy holds the shadow's only connection; the next ones are dropped, and the
    // client's answers come from the primary without waiting for the shadow.
    for _ in 0..5 {
        let answer = get_alone(&mesh, "/held").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    shadow.held(1).await;
    let dropped = [("event", "mirror_dropped")];
    eventually(|| mesh.metric("mesh_engine_events_total", &dropped) == 4.0).await;
    shadow.release();
    assert_eq!(shadow.accepted(), 1);
}

#[tokio::test(start_paused = true)]
async fn opaque_tcp_honours_max_connections_and_connect_timeout() {
    let echo_ip = loopback();
    let listener = TcpListener::bind((echo_ip, UPSTREAM_PORT))
        .await
        .expect("bind");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let silent_ip = loopback();
    let _silent = never_answering(silent_ip).await;
    let silent_vip = Ipv4Addr::new(10, 96, 0, 62);
    let mut yaml = service(
        "echo",
        VIP,
        8080,
        "tcp-echo",
        &[Backend {
            pod: "echo-0",
            ip: echo_ip,
            labels: &[("app", "echo")],
        }],
    );
    yaml.push_str("---\n");
    yaml.push_str(&service(
        "silent",
        silent_vip,
        8080,
        "tcp-silent",
        &[Backend {
            pod: "silent-0",
            ip: silent_ip,
            labels: &[("app", "silent")],
        }],
    ));
    for host in ["echo", "silent"] {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {host}, namespace: default}}\n\
             spec:\n  host: {host}\n  trafficPolicy:\n    connectionPool: \
             {{tcp: {{maxConnections: 1, connectTimeout: 250ms}}}}\n"
        ));
    }
    let mesh = Mesh::start(&yaml).await;

    // The one connection the limit allows is carried; a second one is closed at once.
    let mut first = mesh.connect(SERVICE).await;
    let mut echoed = [0; 4];
    first.write_all(b"ping").await.expect("write");
    first.read_exact(&mut echoed).await.expect("echoed");
    let mut second = mesh.connect(SERVICE).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "refused: {read:?}");
    let service = [("destination_service", "echo.default.svc.cluster.local")];
    assert_eq!(mesh.metric("mesh_pool_overflows_total", &service), 1.0);
    // Once the first is gone, its slot is free again.
    drop(first);
    let mut third = loop {
        let mut third = mesh.connect(SERVICE).await;
        third.write_all(b"ping").await.expect("write");
        if third.read_exact(&mut echoed).await.is_ok() {
            break third;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    third.write_all(b"pong").await.expect("write");
    third.read_exact(&mut echoed).await.expect("echoed");
    assert_eq!(&echoed, b"pong");

    // An endpoint that never answers: three dials (Istio's default retries), 250 ms each.
    let started = Instant::now();
    let mut silent = mesh.connect(SocketAddrV4::new(silent_vip, 8080)).await;
    let read = tokio::time::timeout(Duration::from_secs(60), silent.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "closed: {read:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(750) && took < Duration::from_secs(1),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_max_requests_refuses_tries_over_the_limit_with_uo() {
    let upstream = Counted::start().await;
    let mesh = mesh(
        &upstream,
        "http",
        &pool_rule("{http: {http2MaxRequests: 1}}"),
    )
    .await;
    let mut first = mesh.http1(SERVICE).await;
    let held = tokio::spawn(async move { first.get("pool", "/held").await });
    upstream.held(1).await;
    // No connection limit, but one try in flight at most: refused, not queued.
    let refused = get_alone(&mesh, "/held").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flags(&refused), "UO");
    upstream.release();
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(get_alone(&mesh, "/").await.status, StatusCode::OK);
}
