//! The tunnel between agents in process: a source pod's connections to a pod in the mesh go
//! through HBONE (HTTP/2 CONNECT over mutual TLS on the pod's port 15008) to an inbound
//! listener that delivers to the pod; clients that cannot prove an identity of the mesh are
//! refused and counted; the listener's bounds hold.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::{
    engine::EngineSettings,
    hbone::{self, Hbone, InboundPod, Source, TunnelClient},
    identity::{
        ca::CertificateAuthority,
        certificates::{CertificateSettings, CertificateStore, SystemClock, WorkloadCertificate},
        spiffe::{SpiffeId, TrustDomain},
        tls,
    },
    inbound::InboundLimits,
    proxy::{Drain, PodContext},
    redirect::Exemption,
    state::Store,
};
use prometheus_client::registry::Registry;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    sign::CertifiedKey,
    DigitallySignedStruct, SignatureScheme,
};
use support::{loopback, service, Backend, Mesh, Options, Upstream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const DAY: Duration = Duration::from_secs(24 * 3600);
const IN_MESH: (&str, &str) = ("sidecarless.io/mesh", "enabled");

fn ca() -> Arc<CertificateAuthority> {
    Arc::new(
        CertificateAuthority::generate(TrustDomain::default(), SystemTime::now(), 365 * DAY)
            .expect("a CA"),
    )
}

fn store(ca: &Arc<CertificateAuthority>) -> Arc<CertificateStore> {
    Arc::new(CertificateStore::new(
        Arc::clone(ca),
        CertificateSettings::default(),
        Arc::new(SystemClock),
    ))
}

fn id(namespace: &str, account: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::default(), namespace, account).expect("an identity")
}

/// A source pod (`client-0`) and a destination pod (`server-0`, in the mesh unless `in_mesh`
/// says otherwise) behind service `web`, each with an agent's view: the source's connections
/// tunnel, the destination's tunnel listener serves on its address, port 15008.
struct Tunnelled {
    mesh: Mesh,
    /// The source agent's.
    hbone: Arc<Hbone>,
    /// The destination agent's.
    destination: Arc<Hbone>,
    server: Upstream,
    ca: Arc<CertificateAuthority>,
    drain: Drain,
}

async fn tunnelled(in_mesh: bool, limits: InboundLimits) -> Tunnelled {
    let ip = loopback();
    let server = Upstream::start(ip, "server").await;
    let labels: &[(&str, &str)] = if in_mesh {
        &[("app", "server"), IN_MESH]
    } else {
        &[("app", "server")]
    };
    let yaml = service(
        "web",
        VIP,
        80,
        "http",
        &[Backend {
            pod: "server-0",
            ip,
            labels,
        }],
    );
    let mut mesh = Mesh::with(&yaml, Options::default()).await;
    let ca = ca();
    let hbone = Hbone::new(
        Arc::clone(&mesh.store),
        store(&ca),
        Arc::clone(&mesh.telemetry),
        limits,
        mesh.registry.sub_registry_with_prefix("mesh"),
    );
    // The destination agent: its own view of the cluster, its own certificates, reporting
    // through the same registry (so one scrape shows both sides).
    let destination_store = Arc::new(
        Store::open(None, EngineSettings::default(), &mut Registry::default()).expect("a store"),
    );
    if let Err(diagnostics) = destination_store.apply("test.yml", &yaml) {
        panic!("{diagnostics:?}");
    }
    let destination = Hbone::new(
        destination_store,
        store(&ca),
        Arc::clone(&mesh.telemetry),
        limits,
        &mut Registry::default(),
    );
    mesh.pod = Arc::new(
        PodContext::new("client-0".into(), "default".into(), None, Exemption::None).with_tunnel(
            Arc::new(TunnelClient::new(
                Arc::clone(&hbone),
                Source::Pod {
                    namespace: "default".into(),
                    name: "client-0".into(),
                },
            )),
        ),
    );
    let drain = Drain::default();
    let listener = TcpListener::bind((ip, hbone::PORT))
        .await
        .expect("bind :15008");
    tokio::spawn(hbone::serve_inbound(
        Arc::clone(&destination),
        listener,
        InboundPod {
            name: "server-0".into(),
            namespace: "default".into(),
            netns: None,
            exemption: Exemption::None,
        },
        drain.clone(),
    ));
    Tunnelled {
        mesh,
        hbone,
        destination,
        server,
        ca,
        drain,
    }
}

impl Tunnelled {
    fn pod_ip(&self) -> IpAddr {
        self.server.addr.ip()
    }

    fn tunnel_addr(&self) -> SocketAddr {
        SocketAddr::new(self.pod_ip(), hbone::PORT)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_pod_in_the_mesh_share_one_tunnel_and_carry_both_identities() {
    let t = tunnelled(true, InboundLimits::default()).await;
    for _ in 0..3 {
        let mut client = t.mesh.http1(std::net::SocketAddrV4::new(VIP, 80)).await;
        for _ in 0..5 {
            let answer = client.get("web", "/").await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.text(), "server");
        }
    }
    assert_eq!(t.server.requests(), 15);
    // Three client connections, three upstream HTTP/1.1 connections at most: one tunnel.
    assert_eq!(t.hbone.metrics().handshakes("outbound"), 1);
    assert_eq!(t.destination.metrics().handshakes("inbound"), 1);
    let client_id = "spiffe://cluster.local/ns/default/sa/default";
    let requests = t.mesh.metric(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_principal", client_id),
            ("destination_principal", client_id),
            ("connection_security_policy", "mutual_tls"),
            ("destination_workload", "server-0"),
        ],
    );
    assert_eq!(requests, 15.0);
    drop(t.mesh.http1(std::net::SocketAddrV4::new(VIP, 80)).await);
    // The destination side reports each tunnelled connection once it closes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let destination = [
        ("reporter", "destination"),
        ("source_principal", client_id),
        ("destination_principal", client_id),
        ("connection_security_policy", "mutual_tls"),
        ("destination_workload", "server-0"),
    ];
    while t
        .mesh
        .metric("istio_tcp_connections_opened_total", &destination)
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no destination series"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_outside_the_mesh_gets_plaintext_and_says_so() {
    let t = tunnelled(false, InboundLimits::default()).await;
    let mut client = t.mesh.http1(std::net::SocketAddrV4::new(VIP, 80)).await;
    assert_eq!(client.get("web", "/").await.status, StatusCode::OK);
    assert_eq!(t.hbone.metrics().handshakes("outbound"), 0);
    let plaintext = t.mesh.metric(
        "istio_requests_total",
        &[
            ("source_principal", "unknown"),
            ("destination_principal", "unknown"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(plaintext, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_goes_through_the_tunnel_too() {
    let t = tunnelled(true, InboundLimits::default()).await;
    // Straight to the pod's address (no service): the same tunnel.
    let mut stream = t
        .mesh
        .connect(std::net::SocketAddrV4::new(
            match t.pod_ip() {
                IpAddr::V4(ip) => ip,
                IpAddr::V6(_) => unreachable!("loopback() is IPv4"),
            },
            support::UPSTREAM_PORT,
        ))
        .await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.ends_with(b"server"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(t.hbone.metrics().handshakes("outbound"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_is_not_who_discovery_says_is_a_connect_failure() {
    let t = tunnelled(true, InboundLimits::default()).await;
    // Discovery now says the pod runs as `web`; its agent still presents `default`.
    t.mesh.apply(
        &service(
            "web",
            VIP,
            80,
            "http",
            &[Backend {
                pod: "server-0",
                ip: match t.pod_ip() {
                    IpAddr::V4(ip) => ip,
                    IpAddr::V6(_) => unreachable!(),
                },
                labels: &[("app", "server"), IN_MESH],
            }],
        )
        .replace(
            "status: {podIP",
            "spec: {serviceAccountName: web}\nstatus: {podIP",
        ),
    );
    let mut client = t.mesh.http1(std::net::SocketAddrV4::new(VIP, 80)).await;
    let answer = client.get("web", "/").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(t.server.requests(), 0);
    assert!(
        t.hbone
            .metrics()
            .handshake_failures("outbound", "wrong_identity")
            >= 1
    );
    let failed = t.mesh.metric(
        "istio_requests_total",
        &[("response_flags", "UF,URX"), ("response_code", "503")],
    ) + t.mesh.metric(
        "istio_requests_total",
        &[("response_flags", "UF"), ("response_code", "503")],
    );
    assert_eq!(failed, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_gateway_tunnels_to_pods_in_the_mesh_as_its_own_identity() {
    let t = tunnelled(true, InboundLimits::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ingress = listener.local_addr().unwrap();
    let ip = match t.pod_ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => unreachable!("loopback() is IPv4"),
    };
    let mut yaml = service(
        "web",
        VIP,
        80,
        "http",
        &[Backend {
            pod: "server-0",
            ip,
            labels: &[("app", "server"), IN_MESH],
        }],
    );
    yaml.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1beta1\nkind: Gateway\n\
         metadata: {{name: public, namespace: istio-system}}\n\
         spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n\
         \x20 - port: {{number: {}, name: http, protocol: HTTP}}\n    hosts: ['*']\n\
         ---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
         metadata: {{name: public, namespace: default}}\n\
         spec:\n  hosts: ['*']\n  gateways: [istio-system/public]\n  http:\n\
         \x20 - route:\n    - destination: {{host: web}}\n",
        ingress.port()
    ));
    t.mesh.apply(&yaml);
    let identity = id("istio-system", "istio-ingressgateway-service-account");
    let gateway = PodContext::new(
        "istio-ingressgateway".into(),
        "istio-system".into(),
        None,
        Exemption::None,
    )
    .with_tunnel(Arc::new(TunnelClient::new(
        Arc::clone(&t.hbone),
        Source::Fixed(identity.clone()),
    )));
    tokio::spawn(Arc::clone(&t.mesh.proxy).serve_ingress(listener, Arc::new(gateway)));
    let mut client = support::Http1::over(TcpStream::connect(ingress).await.unwrap()).await;
    for _ in 0..3 {
        let answer = client.get("shop.example.com", "/").await;
        assert_eq!((answer.status, answer.text()), (StatusCode::OK, "server"));
    }
    assert_eq!(t.hbone.metrics().handshakes("outbound"), 1);
    let tunnelled = t.mesh.metric(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_principal", identity.as_str()),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(tunnelled, 3.0);
}

/// A certificate given as is, whatever the server asks.
#[derive(Debug)]
struct Presenting(Arc<CertifiedKey>);

impl ResolvesClientCert for Presenting {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts any server: these clients test what the server refuses.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// A TLS 1.3 client with ALPN h2 presenting `certificate`, on a tunnel connection to `addr`.
async fn tunnel_presenting(
    certificate: &WorkloadCertificate,
    addr: SocketAddr,
) -> Result<Sender, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_cert_resolver(Arc::new(Presenting(Arc::clone(
            certificate.certified_key(),
        ))));
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send_connect(
    sender: &mut Sender,
    target: &str,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Opens a tunnel connection presenting `certificate` and sends `CONNECT target` on it.
/// Returns the status, or the error that ended it.
async fn connect_presenting(
    certificate: &WorkloadCertificate,
    addr: SocketAddr,
    target: &str,
) -> Result<StatusCode, String> {
    let mut sender = tunnel_presenting(certificate, addr).await?;
    Ok(send_connect(&mut sender, target).await?.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_identity_of_the_mesh_are_refused_and_counted() {
    let t = tunnelled(true, InboundLimits::default()).await;
    let target = SocketAddr::new(t.pod_ip(), support::UPSTREAM_PORT).to_string();
    let now = SystemTime::now();
    let client = id("default", "client");

    // A certificate of the right CA works: the control.
    let good = WorkloadCertificate::issue(&t.ca, &client, now, DAY).unwrap();
    assert_eq!(
        connect_presenting(&good, t.tunnel_addr(), &target).await,
        Ok(StatusCode::OK)
    );

    let forged_ca = ca();
    let forged = WorkloadCertificate::issue(&forged_ca, &client, now, DAY).unwrap();
    assert!(connect_presenting(&forged, t.tunnel_addr(), &target)
        .await
        .is_err());

    let expired = WorkloadCertificate::issue(&t.ca, &client, now - 3 * DAY, DAY).unwrap();
    assert!(connect_presenting(&expired, t.tunnel_addr(), &target)
        .await
        .is_err());

    let mut plain = TcpStream::connect(t.tunnel_addr()).await.unwrap();
    plain
        .write_all(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    // At most a TLS alert: never an HTTP answer.
    assert!(
        !answer.windows(4).any(|w| w == b"HTTP"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let metrics = t.destination.metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.handshake_failures("inbound", "not_tls") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "plain TCP not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.handshake_failures("inbound", "untrusted"), 1);
    assert_eq!(metrics.handshake_failures("inbound", "expired"), 1);
    assert_eq!(metrics.handshake_failures("inbound", "not_tls"), 1);
    assert_eq!(metrics.handshakes("inbound"), 1);
    assert_eq!(t.server.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_goes_to_this_pod_only() {
    let t = tunnelled(true, InboundLimits::default()).await;
    let good = WorkloadCertificate::issue(&t.ca, &id("default", "client"), SystemTime::now(), DAY)
        .unwrap();
    let other_pod = Upstream::start(loopback(), "other").await;
    let cases = [
        (other_pod.addr.to_string(), StatusCode::FORBIDDEN),
        ("not-an-address:80".to_owned(), StatusCode::BAD_REQUEST),
        (
            // Nothing listens there in the pod.
            SocketAddr::new(t.pod_ip(), 1).to_string(),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ];
    for (target, want) in cases {
        assert_eq!(
            connect_presenting(&good, t.tunnel_addr(), &target).await,
            Ok(want),
            "CONNECT {target}"
        );
    }
    assert_eq!(other_pod.requests(), 0);
    assert_eq!(
        t.destination
            .metrics()
            .refused_streams("inbound", "forbidden"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_cut_off() {
    let t = tunnelled(
        true,
        InboundLimits {
            handshake_timeout: Duration::from_millis(200),
            ..InboundLimits::default()
        },
    )
    .await;
    let mut silent = TcpStream::connect(t.tunnel_addr()).await.unwrap();
    let mut buf = [0; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert_eq!(
        t.destination
            .metrics()
            .handshake_failures("inbound", "timeout"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_listeners_bound_are_closed_and_counted() {
    let t = tunnelled(
        true,
        InboundLimits {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(30),
            ..InboundLimits::default()
        },
    )
    .await;
    // The first holds the one place (it never finishes its handshake).
    let _first = TcpStream::connect(t.tunnel_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = TcpStream::connect(t.tunnel_addr()).await.unwrap();
    let mut buf = [0; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert_eq!(
        t.mesh.metric(
            "mesh_proxy_limit_hits_total",
            &[("limit", "tunnel_connections")]
        ),
        1.0
    );
    drop(t.drain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_a_connections_bound_wait_for_a_free_one() {
    let t = tunnelled(
        true,
        InboundLimits {
            max_streams: 1,
            ..InboundLimits::default()
        },
    )
    .await;
    let good = WorkloadCertificate::issue(&t.ca, &id("default", "client"), SystemTime::now(), DAY)
        .unwrap();
    let target = SocketAddr::new(t.pod_ip(), support::UPSTREAM_PORT).to_string();
    let mut sender = tunnel_presenting(&good, t.tunnel_addr()).await.unwrap();
    let first = send_connect(&mut sender, &target).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first = hyper::upgrade::on(first).await.unwrap();
    let mut second_sender = sender.clone();
    let second = tokio::spawn(async move { send_connect(&mut second_sender, &target).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a second stream opened past the bound"
    );
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second stream opens once the first is closed")
        .unwrap()
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
}

/// An identity no enrolled pod has any more is let go (a signer would refuse to renew it, and
/// one expired while its renewal failed would make the agent unready); a kept one (the ingress
/// gateway's) stays.
#[tokio::test]
async fn certificates_of_identities_no_enrolled_pod_has_are_let_go() {
    let tunnelled = tunnelled(true, InboundLimits::default()).await;
    let hbone = &tunnelled.destination;
    let certificates = hbone.certificates();
    let gateway = id("istio-system", "istio-ingressgateway-service-account");
    hbone.keep_identity(gateway.clone());
    for identity in [id("default", "default"), id("shop", "web"), gateway.clone()] {
        certificates.ready(&identity).await.expect("a certificate");
    }
    let held = |mut ids: Vec<SpiffeId>| {
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        ids.iter()
            .map(|id| id.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    // server-0 (namespace default) runs as service account default.
    hbone.forget_unused_identities([("default", "server-0")]);
    assert_eq!(
        held(certificates.identities()),
        held(vec![id("default", "default"), gateway.clone()])
    );
    hbone.forget_unused_identities([]);
    assert_eq!(held(certificates.identities()), held(vec![gateway]));
}
