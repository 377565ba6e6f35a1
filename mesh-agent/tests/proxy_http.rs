//! The HTTP proxy in process: a client pod's connections to a service VIP, handed to the proxy
//! as the accept layer would, routed by the tutorial's rules to real upstreams. No root needed.

mod support;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use support::{
    example, get, loopback, service, service_c_yaml, Backend, Body, Http1, Mesh, Upstream,
    SERVICE_C,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `service-c` with a v1 and a v2 pod (subsets `version-v1`, `version-v2`), plus `rules`.
struct ServiceC {
    mesh: Mesh,
    v1: Upstream,
    v2: Upstream,
}

async fn service_c(rules: &[&str]) -> ServiceC {
    let (ip1, ip2) = (loopback(), loopback());
    let v1 = Upstream::start(ip1, "v1").await;
    let v2 = Upstream::start(ip2, "v2").await;
    let mut yaml = service_c_yaml(ip1, ip2);
    for rule in rules {
        yaml.push_str("\n---\n");
        yaml.push_str(rule);
    }
    ServiceC {
        mesh: Mesh::start(&yaml).await,
        v1,
        v2,
    }
}

/// Sends `count` GETs over `connections` keep-alive connections; (v1, v2, other) bodies.
async fn spread(mesh: &Mesh, count: usize, connections: usize) -> (usize, usize, usize) {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut client = mesh.http1(SERVICE_C).await;
        let share = count / connections + usize::from(c < count % connections);
        tasks.push(tokio::spawn(async move {
            let mut bodies = Vec::new();
            for _ in 0..share {
                bodies.push(client.get("service-c:8080", "/").await.body);
            }
            bodies
        }));
    }
    let (mut v1, mut v2, mut other) = (0, 0, 0);
    for task in tasks {
        for body in task.await.expect("client task") {
            match &body[..] {
                b"v1" => v1 += 1,
                b"v2" => v2 += 1,
                _ => other += 1,
            }
        }
    }
    (v1, v2, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_ten_split_holds_over_keep_alive_connections() {
    let c = service_c(&[&example("canary/2-vs-v1_and_v2_90_10.yml")]).await;
    let (v1, v2, other) = spread(&c.mesh, 1000, 4).await;
    // Exact: the split is smooth weighted round-robin, whatever the connection.
    assert_eq!((v1, v2, other), (900, 100, 0));
    assert_eq!((c.v1.requests(), c.v2.requests()), (900, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_endpoint_fails_half_the_requests_until_outlier_detection_and_retries() {
    let c = service_c(&[]).await;
    c.v2.fail_with(500);
    let mut client = c.mesh.http1(SERVICE_C).await;
    let mut failed = 0;
    for _ in 0..400 {
        if client.get("service-c", "/").await.status == StatusCode::INTERNAL_SERVER_ERROR {
            failed += 1;
        }
    }
    assert!(
        (120..=280).contains(&failed),
        "no policy: {failed} of 400 failed"
    );

    c.mesh
        .apply(&example("circuit-breaker/2-destination-rules.yml"));
    c.mesh.apply(&example("circuit-breaker/3-vs-retry.yml"));
    for _ in 0..1000 {
        let answer = client.get("service-c", "/").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let engine = c.mesh.store.snapshot().engine.clone();
    assert_eq!(engine.ejected("service-c", 8080, None), vec![c.v2.addr]);
    // The engine counts what it did per destination service, and `/metrics` serves it.
    let service = [("destination_service", "service-c.default.svc.cluster.local")];
    assert!(c.mesh.metric("mesh_outlier_ejections_total", &service) >= 1.0);
    assert!(c.mesh.metric("mesh_retries_total", &service) >= 1.0);
    assert_eq!(c.mesh.metric("mesh_pool_overflows_total", &service), 0.0);
    assert!(
        c.mesh
            .metric("mesh_engine_events_total", &[("event", "retry")])
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_are_routed_by_the_rules() {
    let c = service_c(&[&example("canary/4-vs-v2.yml")]).await;
    let mut h2 = c.mesh.http2(SERVICE_C).await;
    for _ in 0..20 {
        let request = Request::get("http://service-c:8080/")
            .version(Version::HTTP_2)
            .body(Body::default())
            .expect("request");
        let answer = h2.send(request).await;
        assert_eq!((answer.status, answer.text()), (StatusCode::OK, "v2"));
    }
    for _ in 0..20 {
        let request = Request::post("http://service-c:8080/demo.Echo/Say")
            .version(Version::HTTP_2)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("request");
        let answer = h2.send(request).await;
        assert_eq!(answer.headers["grpc-status"], "0");
        assert_eq!(&answer.body[5..], b"v2");
    }
    assert_eq!((c.v1.requests(), c.v2.requests()), (0, 40));
}

/// Writes `request` on a fresh connection and reads until the proxy closes it.
async fn raw_exchange(mesh: &Mesh, request: &[u8]) -> String {
    let mut stream = mesh.connect(SERVICE_C).await;
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_get_400_or_431_and_reach_no_upstream() {
    let c = service_c(&[&example("canary/1-vs-v1.yml")]).await;
    let both = raw_exchange(
        &c.mesh,
        b"POST / HTTP/1.1\r\nHost: service-c\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(both.starts_with("HTTP/1.1 400"), "{both}");
    let lengths = raw_exchange(
        &c.mesh,
        b"POST / HTTP/1.1\r\nHost: service-c\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert!(lengths.starts_with("HTTP/1.1 400"), "{lengths}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: service-c\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let too_large = raw_exchange(&c.mesh, big.as_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");
    assert_eq!(c.v1.requests() + c.v2.requests(), 0);
    // The connection to the service still works for a well-formed request.
    let mut client = c.mesh.http1(SERVICE_C).await;
    assert_eq!(client.get("service-c", "/").await.text(), "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_without_waiting_for_the_upstream() {
    let rule = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: service-c, namespace: default}
spec:
  hosts: [service-c]
  http:
  - match: [{uri: {prefix: /delay}}]
    timeout: 0.2s
    route: [{destination: {host: service-c, subset: version-v1}}]
  - route: [{destination: {host: service-c, subset: version-v1}}]
"#;
    let c = service_c(&[rule]).await;
    let mut client = c.mesh.http1(SERVICE_C).await;
    let started = Instant::now();
    let slow = client.get("service-c", "/delay/3000").await;
    let took = started.elapsed();
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{}", slow.text());
    assert_eq!(slow.headers["x-mesh-response-flags"], "UT");
    assert_eq!(slow.text(), "upstream request timeout");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Without a timeout the same delay is waited for.
    let mut client = c.mesh.http1(SERVICE_C).await;
    let unbounded = client.get("service-c", "/other").await;
    assert_eq!(unbounded.text(), "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_and_no_healthy_upstream_are_local_replies() {
    let c = service_c(&[]).await;
    // A subset whose labels no pod has: no endpoints.
    let rule = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: service-c, namespace: default}
spec:
  host: service-c
  subsets: [{name: version-v9, labels: {version: v9}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: service-c, namespace: default}
spec:
  hosts: [service-c]
  http:
  - match: [{uri: {prefix: /v9}}]
    route: [{destination: {host: service-c, subset: version-v9}}]
"#;
    c.mesh.apply(rule);
    let mut client = c.mesh.http1(SERVICE_C).await;
    let answer = client.get("unknown-host", "/").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.text(), "no route");
    assert_eq!(answer.headers["x-mesh-response-flags"], "NR");
    let answer = client.get("service-c", "/v9").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.text(), "no healthy upstream");
    assert_eq!(answer.headers["x-mesh-response-flags"], "UH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_gateway_routes_by_gateway_bound_rules_with_rewrite() {
    let ip = loopback();
    let a = Upstream::start(ip, "a").await;
    let mut yaml = service(
        "service-a",
        Ipv4Addr::new(10, 96, 0, 10),
        8080,
        "http",
        &[Backend {
            pod: "service-a-0",
            ip,
            labels: &[("app", "service-a")],
        }],
    );
    yaml.push_str("---\n");
    yaml.push_str(&example("gateway.yml"));
    let mesh = Mesh::start(&yaml).await;
    // The Gateway's server is on port 80; a listener on another port tries every gateway.
    let ingress = mesh.ingress().await;
    let mut client = Http1::over(
        tokio::net::TcpStream::connect(ingress)
            .await
            .expect("connect"),
    )
    .await;
    let seen = client.get("gateway.example", "/service-a/headers").await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.text());
    assert_eq!(seen.json()[":path"], "/headers");
    let other = client.send(get("gateway.example", "/other")).await;
    assert_eq!(
        other.status,
        StatusCode::NOT_FOUND,
        "no gateway route for /other"
    );
    assert_eq!(a.requests(), 1);
}
