//! The ingress gateway in process: which `Gateway`s the agent's built-in gateway serves (those
//! whose `selector` its labels satisfy, by default Istio's `istio: ingressgateway`) and which
//! hosts a gateway-bound VirtualService serves through it (those its servers' `hosts` admit on
//! the listener's port). Real client connections to the ingress listener, real upstreams.

mod support;

use std::{net::Ipv4Addr, sync::Arc};

use http::StatusCode;
use mesh_agent::{proxy::PodContext, redirect::Exemption};
use support::{loopback, service, Backend, Http1, Mesh, Upstream};
use tokio::net::{TcpListener, TcpStream};

/// `service-a` and `service-b`, each with one pod answering its name.
async fn services() -> (String, Upstream, Upstream) {
    let (ip_a, ip_b) = (loopback(), loopback());
    let a = Upstream::start(ip_a, "a").await;
    let b = Upstream::start(ip_b, "b").await;
    let backend = |pod, ip, app| Backend {
        pod,
        ip,
        labels: Box::leak(Box::new([("app", app)])),
    };
    let mut yaml = service(
        "service-a",
        Ipv4Addr::new(10, 96, 0, 10),
        8080,
        "http",
        &[backend("service-a-0", ip_a, "service-a")],
    );
    yaml.push_str("---\n");
    yaml.push_str(&service(
        "service-b",
        Ipv4Addr::new(10, 96, 0, 11),
        8080,
        "http",
        &[backend("service-b-0", ip_b, "service-b")],
    ));
    (yaml, a, b)
}

/// A Gateway in `istio-system` and a VirtualService (hosts `*`) bound to it that sends
/// everything to `service`.
fn gateway(name: &str, selector: &str, servers: &[(u16, &str)], service: &str) -> String {
    let servers: String = servers
        .iter()
        .map(|(port, hosts)| {
            format!(
                "  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: {hosts}\n"
            )
        })
        .collect();
    format!(
        "---\napiVersion: networking.istio.io/v1beta1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: istio-system}}\n\
         spec:\n  selector: {selector}\n  servers:\n{servers}\
         ---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  hosts: ['*']\n  gateways: [istio-system/{name}]\n  http:\n\
         \x20 - route:\n    - destination: {{host: {service}}}\n"
    )
}

/// Serves the ingress gateway on `listener`, as `mesh-agent run --ingress` does.
fn serve_ingress(mesh: &Mesh, listener: TcpListener) {
    let gateway = Arc::new(PodContext::new(
        "istio-ingressgateway".into(),
        "istio-system".into(),
        None,
        Exemption::None,
    ));
    tokio::spawn(Arc::clone(&mesh.proxy).serve_ingress(listener, gateway));
}

async fn client(listener: std::net::SocketAddr) -> Http1 {
    Http1::over(TcpStream::connect(listener).await.expect("connect")).await
}

/// The status and body of `GET /` with `Host: host`, and the response flags when refused.
async fn ask(client: &mut Http1, host: &str) -> (StatusCode, String) {
    let answer = client.get(host, "/").await;
    let text = match answer.headers.get("x-mesh-response-flags") {
        Some(flags) => format!("{} {}", answer.text(), flags.to_str().expect("ASCII")),
        None => answer.text().to_owned(),
    };
    (answer.status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_rule_serves_only_the_hosts_its_gateway_admits_on_the_port() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (mut yaml, a, b) = services().await;
    // Served (the tutorial's selector) and naming the listener's port.
    yaml.push_str(&gateway(
        "public",
        "{istio: ingressgateway}",
        &[(port, "[shop.example.com, '*.api.example.com']")],
        "service-a",
    ));
    // Served, but with no server on this port: not tried here.
    yaml.push_str(&gateway(
        "other-port",
        "{}",
        &[(port.wrapping_add(1).max(1), "['*']")],
        "service-b",
    ));
    let mesh = Mesh::start(&yaml).await;
    serve_ingress(&mesh, listener);
    let mut client = client(([127, 0, 0, 1], port).into()).await;

    assert_eq!(
        ask(&mut client, "shop.example.com").await,
        (StatusCode::OK, "a".into())
    );
    assert_eq!(
        ask(&mut client, &format!("v1.api.example.com:{port}")).await,
        (StatusCode::OK, "a".into())
    );
    // The VirtualService says `*`, its gateway admits less: Envoy's answer for a host no
    // virtual host matches.
    for refused in [
        "other.example.com",
        "api.example.com",
        // A service's own name: the ingress exposes only what a bound rule routes.
        "service-b.default.svc.cluster.local",
    ] {
        assert_eq!(
            ask(&mut client, refused).await,
            (StatusCode::NOT_FOUND, "no route NR".into()),
            "{refused}"
        );
    }
    assert_eq!((a.requests(), b.requests()), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_selector_does_not_match_the_agents_labels_is_not_served() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (mut yaml, a, b) = services().await;
    yaml.push_str(&gateway(
        "egress",
        "{istio: egressgateway}",
        &[(port, "['*']")],
        "service-b",
    ));
    // Istio's ingress gateway also carries `app: istio-ingressgateway`.
    yaml.push_str(&gateway(
        "by-app",
        "{app: istio-ingressgateway}",
        &[(port, "[a.example.com]")],
        "service-a",
    ));
    let mesh = Mesh::start(&yaml).await;
    serve_ingress(&mesh, listener);
    let mut client = client(([127, 0, 0, 1], port).into()).await;

    assert_eq!(
        ask(&mut client, "a.example.com").await,
        (StatusCode::OK, "a".into())
    );
    // The egress gateway would admit every host, were it served.
    assert_eq!(
        ask(&mut client, "b.example.com").await,
        (StatusCode::NOT_FOUND, "no route NR".into())
    );
    assert_eq!((a.requests(), b.requests()), (1, 0));
}

/// A listener on a port no served gateway names (the demo's) tries every served gateway, each
/// admitting the hosts of all its servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_a_port_no_gateway_names_admits_the_hosts_of_every_served_gateway() {
    let (mut yaml, a, b) = services().await;
    yaml.push_str(&gateway(
        "shop",
        "{istio: ingressgateway}",
        &[(80, "[shop.example.com]")],
        "service-a",
    ));
    yaml.push_str(&gateway(
        "status",
        "{istio: ingressgateway}",
        &[(8443, "['istio-system/*']"), (81, "[status.example.com]")],
        "service-b",
    ));
    yaml.push_str(&gateway(
        "egress",
        "{istio: egressgateway}",
        &[(80, "['*']")],
        "service-b",
    ));
    let mesh = Mesh::start(&yaml).await;
    let mut client = client(mesh.ingress().await).await;

    assert_eq!(
        ask(&mut client, "shop.example.com").await,
        (StatusCode::OK, "a".into())
    );
    assert_eq!(
        ask(&mut client, "status.example.com").await,
        (StatusCode::OK, "b".into())
    );
    // `istio-system/*` admits rules of istio-system only; the bound rule lives in default.
    assert_eq!(
        ask(&mut client, "other.example.com").await,
        (StatusCode::NOT_FOUND, "no route NR".into())
    );
    assert_eq!((a.requests(), b.requests()), (1, 1));
}
