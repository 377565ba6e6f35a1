//! The in-process proxy tier's harness (ztunnel's `tests/direct.rs` idea): a real [`Proxy`] on a
//! [`Store`] loaded from Kubernetes/Istio YAML, real HTTP upstreams on loopback addresses, and
//! real client connections accepted on a local listener and handed to the proxy with a made-up
//! original destination (a service VIP from the YAML). No root, no eBPF, no namespaces: the
//! proxy dials from the test's own namespace without a socket mark.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header::CONTENT_TYPE, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_agent::{
    engine::EngineSettings,
    exposition,
    proxy::{Limits, PodContext, Proxy},
    redirect::Exemption,
    state::Store,
    telemetry::{
        metrics::DEFAULT_CLUSTER,
        otlp::{OtlpConfig, SpanExporter},
        AccessLog, AccessLogOptions, Metrics, Telemetry,
    },
};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

/// The port every test upstream listens on (each on its own loopback address).
pub const UPSTREAM_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback address no other test of this process (or, likely, of another process running
/// at the same time) uses: 127.P.N.1 with P from the process id, N counting up.
pub fn loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let process = (std::process::id() % 200) as u8 + 20;
    Ipv4Addr::new(127, process, (n / 250) as u8, (n % 250) as u8 + 2)
}

/// A file from `deploy/examples/`.
pub fn example(path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// A pod behind a service: its name, IP and labels.
pub struct Backend<'a> {
    pub pod: &'a str,
    pub ip: Ipv4Addr,
    pub labels: &'a [(&'a str, &'a str)],
}

/// A `Service` at `vip:port` (its port named `port_name`, which sets the protocol as Istio's
/// does), its `EndpointSlice` and a `Pod` per backend, in namespace `default`. Endpoints listen
/// on `UPSTREAM_PORT`.
pub fn service(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    port_name: &str,
    backends: &[Backend],
) -> String {
    let target = UPSTREAM_PORT;
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: {port_name}, port: {port}, targetPort: {target}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: {port_name}, port: {target}, protocol: TCP}}]\nendpoints:\n"
    );
    for b in backends {
        let _ = writeln!(
            text,
            "- addresses: [{}]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}",
            b.ip, b.pod
        );
    }
    for b in backends {
        let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n  labels: {{{}}}\nstatus: {{podIP: {}}}\n",
            b.pod,
            labels.join(", "),
            b.ip
        );
    }
    text
}

/// What the harness's telemetry is set up with.
#[derive(Default)]
pub struct Options {
    pub access_log: bool,
    pub otlp: Option<OtlpConfig>,
    pub trace_sample_ratio: f64,
    /// The proxy's bounds (default: the agent's defaults).
    pub limits: Limits,
}

/// Access-log lines as the writer thread writes them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The tutorial's service C: its VIP and the port clients dial.
pub const SERVICE_C_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const SERVICE_C: SocketAddrV4 = SocketAddrV4::new(SERVICE_C_VIP, 8080);

/// `service-c` with a v1 pod at `ip1` and a v2 pod at `ip2`, and the tutorial's DestinationRule
/// (subsets `version-v1`, `version-v2`).
pub fn service_c_yaml(ip1: Ipv4Addr, ip2: Ipv4Addr) -> String {
    let mut yaml = service(
        "service-c",
        SERVICE_C_VIP,
        8080,
        "http",
        &[
            Backend {
                pod: "service-c-v1-0",
                ip: ip1,
                labels: &[("app", "service-c"), ("version", "v1")],
            },
            Backend {
                pod: "service-c-v2-0",
                ip: ip2,
                labels: &[("app", "service-c"), ("version", "v2")],
            },
        ],
    );
    yaml.push_str("---\n");
    yaml.push_str(&example("destination-rules.yml"));
    yaml
}

/// A proxy, its store and telemetry, and the pod its connections come from.
pub struct Mesh {
    pub proxy: Arc<Proxy>,
    pub store: Arc<Store>,
    /// Every metric, as `/metrics` serves them.
    pub registry: Registry,
    pub pod: Arc<PodContext>,
    /// What the proxy reports through.
    pub telemetry: Arc<Telemetry>,
    listener: TcpListener,
    log: Captured,
}

impl Mesh {
    /// A mesh with `yaml` applied, no access log, no span export.
    pub async fn start(yaml: &str) -> Mesh {
        Mesh::with(yaml, Options::default()).await
    }

    pub async fn with(yaml: &str, options: Options) -> Mesh {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(DEFAULT_CLUSTER, &mut registry));
        let mesh_registry = registry.sub_registry_with_prefix("mesh");
        let store = Arc::new(
            Store::open(None, EngineSettings::default(), mesh_registry).expect("empty store"),
        );
        let log = Captured::default();
        let (access_log, _writer) = AccessLog::with_writer(
            AccessLogOptions {
                enabled: options.access_log,
                ..AccessLogOptions::default()
            },
            log.clone(),
            1024,
        );
        let spans = options.otlp.map(|config| {
            let (exporter, _task) = SpanExporter::start(config);
            exporter.register_metrics(mesh_registry.sub_registry_with_prefix("trace"));
            exporter
        });
        let telemetry = Arc::new(Telemetry {
            metrics: Arc::clone(&metrics),
            access_log,
            spans,
            trace_sample_ratio: options.trace_sample_ratio,
        });
        let mesh = Mesh {
            proxy: Arc::new(Proxy::with_limits(
                Arc::clone(&store),
                Arc::clone(&telemetry),
                options.limits,
            )),
            telemetry,
            store,
            registry,
            pod: Arc::new(PodContext::new(
                "client-0".into(),
                "default".into(),
                None,
                Exemption::None,
            )),
            listener: TcpListener::bind("127.0.0.1:0").await.expect("listener"),
            log,
        };
        mesh.apply(yaml);
        mesh
    }

    /// `mesh-agent apply`: all of `yaml` or nothing.
    pub fn apply(&self, yaml: &str) {
        if let Err(diagnostics) = self.store.apply("test.yml", yaml) {
            let lines: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
            panic!("config rejected:\n{}", lines.join("\n"));
        }
    }

    /// A client connection the client pod made to `original` (a service VIP, say), as the
    /// accept layer hands it to the proxy; returns the client's end.
    pub async fn connect(&self, original: SocketAddrV4) -> TcpStream {
        let client = TcpStream::connect(self.listener.local_addr().expect("addr"))
            .await
            .expect("connect to the proxy's listener");
        let (accepted, _) = self.listener.accept().await.expect("accept");
        self.proxy.serve(accepted, original, Arc::clone(&self.pod));
        client
    }

    /// An HTTP/1.1 keep-alive connection to `original` through the proxy.
    pub async fn http1(&self, original: SocketAddrV4) -> Http1 {
        Http1::over(self.connect(original).await).await
    }

    /// Starts the ingress gateway on a listener of its own; returns its address.
    pub async fn ingress(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listener");
        let addr = listener.local_addr().expect("addr");
        let gateway = Arc::new(PodContext::new(
            "istio-ingressgateway".into(),
            "istio-system".into(),
            None,
            Exemption::None,
        ));
        tokio::spawn(Arc::clone(&self.proxy).serve_ingress(listener, gateway));
        addr
    }

    /// An HTTP/2 (prior knowledge) connection to `original` through the proxy.
    pub async fn http2(&self, original: SocketAddrV4) -> Http2 {
        let stream = self.connect(original).await;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        Http2(sender)
    }

    /// `/metrics` as Prometheus scrapes it.
    pub fn scrape(&self) -> prometheus_parse::Scrape {
        let (_, text) = exposition::render(&self.registry, None);
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
    }

    /// Sum of the `metric` samples whose labels include all of `want`.
    pub fn metric(&self, metric: &str, want: &[(&str, &str)]) -> f64 {
        self.scrape()
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// The access-log lines written so far, once `count` are there (waits for the writer).
    pub async fn access_log(&self, count: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let lines: Vec<Value> = self
                .log
                .0
                .lock()
                .unwrap()
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("a JSON line"))
                .collect();
            if lines.len() >= count || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn read(response: Response<Incoming>) -> Answer {
    let (head, body) = response.into_parts();
    let collected = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .expect("body in time")
        .expect("body");
    let mut headers = head.headers;
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.clone());
    }
    Answer {
        status: head.status,
        headers,
        body: collected.to_bytes(),
    }
}

pub type Body = Full<Bytes>;

pub struct Http1(hyper::client::conn::http1::SendRequest<Body>);

impl Http1 {
    /// An HTTP/1.1 keep-alive connection over `stream`.
    pub async fn over(stream: TcpStream) -> Http1 {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1 handshake");
        tokio::spawn(connection);
        Http1(sender)
    }

    pub async fn send(&mut self, request: Request<Body>) -> Answer {
        // The previous exchange may still be finishing on the connection's task.
        self.0.ready().await.expect("connection still open");
        let response = tokio::time::timeout(TIMEOUT, self.0.send_request(request))
            .await
            .expect("response in time")
            .expect("response");
        read(response).await
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> Answer {
        self.send(get(host, path)).await
    }
}

pub struct Http2(hyper::client::conn::http2::SendRequest<Body>);

impl Http2 {
    pub async fn send(&mut self, request: Request<Body>) -> Answer {
        // The previous exchange may still be finishing on the connection's task.
        self.0.ready().await.expect("connection still open");
        let response = tokio::time::timeout(TIMEOUT, self.0.send_request(request))
            .await
            .expect("response in time")
            .expect("response");
        read(response).await
    }
}

pub fn get(host: &str, path: &str) -> Request<Body> {
    Request::get(path)
        .header(http::header::HOST, host)
        .body(Body::default())
        .expect("request")
}

/// A real HTTP/1.1 + h2c + gRPC server: `/headers` answers the request's headers as JSON
/// (`:path` included), `/delay/MS` answers after MS milliseconds, anything else answers its
/// name (or the failing status, when set); gRPC calls get the name as their message.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

struct UpstreamState {
    name: String,
    failing: AtomicU16,
    requests: AtomicU64,
}

impl Upstream {
    pub async fn start(ip: Ipv4Addr, name: &str) -> Upstream {
        let listener = TcpListener::bind((ip, UPSTREAM_PORT))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}:{UPSTREAM_PORT}: {e}"));
        let state = Arc::new(UpstreamState {
            name: name.to_owned(),
            failing: AtomicU16::new(0),
            requests: AtomicU64::new(0),
        });
        let served = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&served);
                let service = service_fn(move |request| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(answer(&state, request).await) }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr: SocketAddr::new(ip.into(), UPSTREAM_PORT),
            state,
        }
    }

    /// Answer every plain request with `status` from now on.
    pub fn fail_with(&self, status: u16) {
        self.state.failing.store(status, Ordering::Relaxed);
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }
}

async fn answer(state: &UpstreamState, request: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (parts, body) = request.into_parts();
    let _ = body.collect().await;
    let path = parts.uri.path();
    let reply = |status: StatusCode, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response
    };
    if grpc {
        // A unary reply in one frame, with the status in the head (trailers-only style is
        // not allowed with a message, but a proxy treats both alike).
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(state.name.len() as u32).to_be_bytes());
        frame.extend_from_slice(state.name.as_bytes());
        let mut response = reply(StatusCode::OK, Bytes::from(frame));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("0"));
        return response;
    }
    if path == "/headers" {
        let mut seen: BTreeMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        seen.insert(":path".into(), path.into());
        let json = serde_json::to_vec(&seen).expect("JSON");
        return reply(StatusCode::OK, Bytes::from(json));
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms: u64 = ms.parse().expect("a delay in ms");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match state.failing.load(Ordering::Relaxed) {
        0 => reply(StatusCode::OK, Bytes::from(state.name.clone())),
        code => reply(
            StatusCode::from_u16(code).expect("a status"),
            Bytes::from(format!("Error {code}")),
        ),
    }
}

/// A local OTLP/HTTP collector: answers 200 and hands over each decoded export.
pub async fn otlp_collector() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    >,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .expect("body")
                        .to_bytes();
                    let _ =
                        tx.send(ExportTraceServiceRequest::decode(body).expect("OTLP protobuf"));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, rx)
}

/// An echo server (bytes back as they come) on `ip`:`UPSTREAM_PORT`.
pub async fn echo_server(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, UPSTREAM_PORT)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}
