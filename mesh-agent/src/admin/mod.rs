//! The admin API: health, readiness, metrics, the config in force and run-time enrollment.
//! Served on its own thread and runtime so it answers even when the data path is saturated.
//!
//! Two listeners, and who can reach each decides what it serves:
//! - the Unix socket ([`SocketFile`], root only by its file mode): everything; in local mode the
//!   only way to change anything (`/apply`, `/delete`, `/pods`, `/logging`);
//! - the TCP address (`--admin`), reachable by every local user, and in Kubernetes mode by every
//!   pod: in local mode reads only; in Kubernetes mode probes, metrics and the graph of them only.
//!
//! Kubernetes mode takes no writes at all: the cluster's objects and labels are the truth.

pub mod client;
mod server;

use std::{net::SocketAddr, path::Path, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;

pub use self::server::Limits;
use self::server::{read_body, text, Answer, Handler};
use crate::{
    config::{Diagnostic, ObjectKey},
    enrollment::{EnrollError, Enrollments, PodSpec},
    exposition,
    readiness::Readiness,
    redirect::Redirect,
    socket_file::SocketFile,
    state::Store,
    telemetry::{graph, reading},
};

/// Where `mesh-agent run` listens and the CLI connects unless told otherwise
/// (`--admin-socket`, or `MESH_ADMIN_SOCKET` for both).
pub const DEFAULT_SOCKET_PATH: &str = "/run/mesh-agent/admin.sock";

pub struct AdminState {
    pub redirect: Arc<Redirect>,
    pub enrollments: Arc<Enrollments>,
    pub store: Arc<Store>,
    /// Every metric of the agent, registered by each subsystem at start-up.
    pub metrics: Arc<Registry>,
    /// Changes the log filter at run time (`/logging?level=...`).
    pub log_level: Option<LogLevelSetter>,
    pub mode: Mode,
    pub readiness: Arc<Readiness>,
    /// What the `/graph` page is drawn from, read while someone watches.
    pub graph: graph::Watch,
}

/// Which listener takes what depends on the mode (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Changes over the Unix socket; reads on the TCP address too.
    Local,
    /// No changes anywhere; the TCP address (the node's, for the kubelet) has probes and
    /// metrics only.
    Kubernetes,
}

pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where a request came in, which says who could have sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    /// The Unix socket: whoever its file mode lets in (root).
    Socket,
    /// The TCP address: any local user; in Kubernetes mode any pod.
    Tcp,
}

/// The running admin server; `stop` ends it, removes its socket file and releases its hold on
/// the agent's state.
pub struct AdminServer {
    pub addr: SocketAddr,
    socket: SocketFile,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl AdminServer {
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
        self.socket.remove();
    }

    /// Stops serving and leaves the socket file: a successor serves both listeners now.
    pub fn hand_over(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Serves both listeners, bound by the caller (or handed over by a predecessor), on a
/// dedicated thread.
pub fn spawn(
    tcp: std::net::TcpListener,
    socket: SocketFile,
    unix: std::os::unix::net::UnixListener,
    state: Arc<AdminState>,
) -> anyhow::Result<AdminServer> {
    tcp.set_nonblocking(true)?;
    unix.set_nonblocking(true)?;
    let addr = tcp.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let socket_shown = socket.path.display().to_string();
    let thread =
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("admin runtime");
                runtime.block_on(async {
                let limits = Limits::default();
                let tcp = tokio::net::TcpListener::from_std(tcp).expect("admin listener");
                let unix = tokio::net::UnixListener::from_std(unix).expect("admin socket");
                let socket_shown: Arc<str> = socket_shown.into();
                let handler = |via: Listener| -> Handler {
                    let (state, socket, limits) =
                        (Arc::clone(&state), Arc::clone(&socket_shown), limits.clone());
                    Arc::new(move |request| {
                        let (state, socket, limits) =
                            (Arc::clone(&state), Arc::clone(&socket), limits.clone());
                        Box::pin(async move { route(&state, via, &socket, &limits, request).await })
                    })
                };
                tokio::select! {
                    _ = read_while_watched(&state) => {}
                    _ = server::serve_tcp(tcp, limits.clone(), handler(Listener::Tcp)) => {}
                    _ = server::serve_unix(unix, limits.clone(), handler(Listener::Socket)) => {}
                    _ = stopped => {}
                }
            });
            })?;
    Ok(AdminServer {
        addr,
        socket,
        stop,
        thread,
    })
}

/// What an endpoint does, for deciding who may call it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// What the kubelet and Prometheus need: health, readiness, metrics (and the graph of them).
    Probe,
    /// Everything else that only reads: the config, counters, pods, endpoint health.
    Read,
    /// Anything that is not a GET: config changes, enrollment, the log level.
    Write,
}

fn access(method: &Method, path: &str) -> Access {
    if method != Method::GET {
        return Access::Write;
    }
    match path {
        // The graph shows what the metrics tell, to whoever may read them.
        "/healthz" | "/ready" | "/metrics" | "/stats/prometheus" | "/graph" | "/graph.json" => {
            Access::Probe
        }
        _ => Access::Read,
    }
}

/// Why a request is refused where it came in, if it is.
fn refusal(mode: Mode, via: Listener, access: Access, socket: &str) -> Option<String> {
    match (mode, via, access) {
        (_, _, Access::Probe)
        | (Mode::Local, _, Access::Read)
        | (_, Listener::Socket, Access::Read) => None,
        (Mode::Local, Listener::Socket, Access::Write) => None,
        (Mode::Local, Listener::Tcp, Access::Write) => Some(format!(
            "changes go through the admin socket {socket} only (mesh-agent apply/delete use it; \
             root only), not through this TCP address\n"
        )),
        (Mode::Kubernetes, _, Access::Write) => Some(
            "read-only in Kubernetes mode: change the cluster's objects and labels instead \
             (the log level: RUST_LOG in the mesh-agent ConfigMap)\n"
                .to_owned(),
        ),
        (Mode::Kubernetes, Listener::Tcp, Access::Read) => Some(format!(
            "in Kubernetes mode this address serves probes and metrics only (/healthz, /ready, \
             /metrics, /graph); the rest is on the admin socket {socket}: \
             kubectl -n sidecarless-system exec <agent pod> -- mesh-agent get all\n"
        )),
    }
}

#[derive(Deserialize)]
struct EnrollRequest {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    netns: std::path::PathBuf,
}

fn default_namespace() -> String {
    "default".to_owned()
}

async fn route(
    state: &AdminState,
    via: Listener,
    socket: &str,
    limits: &Limits,
    req: Request<Incoming>,
) -> Answer {
    let path = req.uri().path().to_owned();
    if let Some(why) = refusal(state.mode, via, access(req.method(), &path), socket) {
        return text(StatusCode::FORBIDDEN, &why);
    }
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/ready") => match state.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(waiting) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: waiting for {waiting}\n"),
            ),
        },
        (Method::GET, "/stats") => json_response(StatusCode::OK, &stats(state)),
        (Method::GET, "/metrics") | (Method::GET, "/stats/prometheus") => {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) = exposition::render(&state.metrics, accept);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            response
        }
        (Method::GET, "/graph") => {
            let mut response = Response::new(Full::new(Bytes::from_static(graph::PAGE.as_bytes())));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        (Method::GET, "/graph.json") => {
            let window = query_param(req.uri(), "window")
                .and_then(|seconds| seconds.parse().ok())
                .map_or(graph::DEFAULT_WINDOW, std::time::Duration::from_secs)
                .min(graph::LONGEST_WINDOW);
            json_response(StatusCode::OK, &graph_now(state, window))
        }
        (Method::GET, "/pods") => json_response(StatusCode::OK, &state.enrollments.list()),
        (Method::GET, "/config_dump") => json_response(StatusCode::OK, &config_dump(&state.store)),
        (Method::GET, "/clusters") => {
            let snapshot = state.store.snapshot();
            let health = snapshot.engine.endpoint_health(std::time::Instant::now());
            json_response(StatusCode::OK, &health)
        }
        (Method::PUT, "/logging") | (Method::POST, "/logging") => {
            match (query_param(req.uri(), "level"), &state.log_level) {
                (Some(level), Some(set)) => match set(&level) {
                    Ok(()) => text(StatusCode::OK, &format!("log level: {level}\n")),
                    Err(error) => text(StatusCode::BAD_REQUEST, &format!("{error}\n")),
                },
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "use /logging?level=debug (or an EnvFilter directive)\n",
                ),
            }
        }
        (Method::POST, "/apply") | (Method::POST, "/delete") => {
            let label = query_param(req.uri(), "file").unwrap_or_else(|| "admin-api".to_owned());
            let body = match read_body(req, limits.max_body_bytes).await {
                Ok(body) => body,
                Err(refused) => return refused,
            };
            let text_body = String::from_utf8_lossy(&body);
            let result = if path == "/apply" {
                state.store.apply(&label, &text_body)
            } else {
                state.store.delete(&label, &text_body)
            };
            let (status, answer) = change_answer(&state.store, result);
            json_response(status, &answer)
        }
        (Method::POST, "/pods") => {
            let body = match read_body(req, limits.max_body_bytes).await {
                Ok(body) => body,
                Err(refused) => return refused,
            };
            let request: EnrollRequest = match serde_json::from_slice(&body) {
                Ok(request) => request,
                Err(error) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("expected {{\"name\": ..., \"netns\": ...}}: {error}\n"),
                    )
                }
            };
            let spec = PodSpec {
                name: request.name,
                namespace: request.namespace,
                netns: request.netns,
            };
            match state.enrollments.enroll(&spec) {
                Ok(pod) => json_response(StatusCode::OK, &pod),
                // The path given is no network namespace (or none we may open): the request's
                // fault.
                Err(error @ EnrollError::Netns { .. }) => {
                    text(StatusCode::BAD_REQUEST, &format!("{error}\n"))
                }
                Err(error) => text(StatusCode::UNPROCESSABLE_ENTITY, &format!("{error}\n")),
            }
        }
        (Method::DELETE, p) if p.starts_with("/pods/") => {
            match state.enrollments.unenroll(&p["/pods/".len()..]) {
                Ok(()) => text(StatusCode::OK, "unenrolled\n"),
                Err(error) => text(StatusCode::NOT_FOUND, &format!("{error}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Reads the agent's metrics every [`graph::EVERY`] for as long as the graph is watched.
async fn read_while_watched(state: &AdminState) {
    let mut every = tokio::time::interval(graph::EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        state
            .graph
            .tick(std::time::Instant::now(), || read_metrics(state));
    }
}

fn read_metrics(state: &AdminState) -> reading::Reading {
    reading::reading(&exposition::render(&state.metrics, None).1)
}

/// The graph of the last `window`, with the endpoints ejected now on the workloads they are.
fn graph_now(state: &AdminState, window: std::time::Duration) -> graph::Graph {
    let now = std::time::Instant::now();
    let (edges, seconds) = state
        .graph
        .view(now, window, || read_metrics(state))
        .unwrap_or_default();
    let snapshot = state.store.snapshot();
    let ejected = snapshot
        .engine
        .endpoint_health(now)
        .into_iter()
        .flat_map(|cluster| cluster.endpoints)
        .filter_map(|endpoint| {
            let left = endpoint.ejected_for?;
            let workload = snapshot.discovered.workload_at(endpoint.address.ip())?;
            let node = reading::Node {
                namespace: workload.identity.namespace.clone(),
                service: workload.identity.canonical_service.clone(),
                version: workload.identity.canonical_revision.clone(),
            };
            let ejected = graph::Ejected {
                address: endpoint.address,
                seconds_left: left.as_secs_f64(),
            };
            Some((node, ejected))
        })
        .collect();
    graph::graph(&edges, seconds, ejected)
}

/// The first value of `name` in the URI's query, decoded (`application/x-www-form-urlencoded`).
fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The answer to `apply`/`delete`: what changed and the warnings about the objects now in force
/// (a `RequestAuthentication` applied is not enforced: the user must hear it), or every
/// diagnostic and nothing changed.
fn change_answer(
    store: &Store,
    result: Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>>,
) -> (StatusCode, serde_json::Value) {
    let lines = |diagnostics: &[Diagnostic]| -> Vec<String> {
        diagnostics
            .iter()
            .map(|d| format!("{}: {d}", d.severity))
            .collect()
    };
    match result {
        Ok((version, keys)) => {
            let snapshot = store.snapshot();
            let warnings: Vec<Diagnostic> =
                keys.iter().flat_map(|k| snapshot.warnings_of(k)).collect();
            (
                StatusCode::OK,
                json!({
                    "version": version,
                    "objects": keys.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "warnings": lines(&warnings),
                }),
            )
        }
        Err(diagnostics) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "diagnostics": lines(&diagnostics) }),
        ),
    }
}

/// The config in force: every object with its identity, the warnings it was loaded with, the
/// objects that have no effect at all (`ignored`: kind, namespace, name, source, reason), and
/// what the sources hold that is invalid (`rejected`: kind, namespace and name when known,
/// source, `outcome` — `last_good_in_force` or `left_out` — and every diagnostic).
fn config_dump(store: &Store) -> serde_json::Value {
    let snapshot = store.snapshot();
    let objects: Vec<serde_json::Value> = snapshot.objects.values().map(|o| o.manifest()).collect();
    let ignored: Vec<serde_json::Value> = snapshot
        .ignored()
        .map(|(object, reason)| {
            json!({
                "kind": &*object.key.kind,
                "namespace": &*object.key.namespace,
                "name": &*object.key.name,
                "source": &*object.origin,
                "reason": reason,
            })
        })
        .collect();
    let rejected: Vec<serde_json::Value> = snapshot
        .rejected
        .iter()
        .map(|rejected| {
            let rejection = &rejected.rejection;
            let key = rejection.key.as_ref();
            json!({
                "kind": key.map(|k| &*k.kind),
                "namespace": key.map(|k| &*k.namespace),
                "name": key.map(|k| &*k.name),
                "source": &*rejection.origin,
                "outcome": rejected.outcome.as_str(),
                "diagnostics": rejection
                    .diagnostics
                    .iter()
                    .map(|d| format!("{}: {d}", d.severity))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "version": snapshot.version,
        "objects": objects,
        "ignored": ignored,
        "rejected": rejected,
        "warnings": snapshot.warnings().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "reloads": {
            "ok": store.reloads.ok.get(),
            "rejected": store.reloads.rejected.get(),
        },
    })
}

/// The redirect's state and the enrolled pods. Kernel decision counters and map sizes exist only
/// in eBPF mode; iptables mode shows them as `null` and counts the pods with rules instead.
fn stats(state: &AdminState) -> serde_json::Value {
    let redirect = &state.redirect;
    let decisions = redirect.decision_counts().map(|counts| {
        counts
            .iter()
            .map(|(decision, count)| (decision.name().to_owned(), json!(count)))
            .collect::<serde_json::Map<_, _>>()
    });
    let original_dst_entries = redirect
        .map_occupancy()
        .map(|(pending, established)| json!({ "pending": pending, "established": established }));
    let mut stats = json!({
        "redirect": redirect.mode().name(),
        "cgroup": redirect.cgroup(),
        "decisions": decisions,
        "original_dst_entries": original_dst_entries,
        "fast_path_sockets": redirect.fast_path_sockets(),
        "pods": state.enrollments.list(),
    });
    if let Some(pods) = redirect.iptables_enrolled() {
        stats["iptables"] =
            json!({ "chain": crate::redirect::iptables::CHAIN, "pods_with_rules": pods });
    }
    stats
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Answer {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineSettings;

    const POLICY: &str = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec: {}
";

    fn gateway(name: &str, selector: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: istio-system}}
spec:
  selector: {selector}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ['*']
"
        )
    }

    #[test]
    fn config_dump_lists_what_has_no_effect_under_ignored() {
        let store = Store::open(None, EngineSettings::default(), &mut Registry::default())
            .expect("an empty store");
        let served = gateway("public", "{istio: ingressgateway}");
        let elsewhere = gateway("egress", "{istio: egressgateway, zone: b}");
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n";
        store.apply("policy.yml", POLICY).expect("accepted");
        store
            .apply(
                "gateways.yml",
                &format!("{served}---\n{elsewhere}---\n{other}"),
            )
            .expect("accepted");
        let dump = config_dump(&store);
        assert_eq!(
            dump["ignored"],
            json!([
                {
                    "kind": "Gateway",
                    "namespace": "istio-system",
                    "name": "egress",
                    "source": "gateways.yml",
                    "reason": "selector istio=egressgateway, zone=b does not match the labels of \
                               this agent's ingress gateway (app=istio-ingressgateway, \
                               istio=ingressgateway): not served",
                },
                {
                    "kind": "RequestAuthentication",
                    "namespace": "shop",
                    "name": "jwt",
                    "source": "policy.yml",
                    "reason": "kind RequestAuthentication is not implemented by this mesh: not enforced",
                },
            ])
        );
        assert_eq!(dump["objects"].as_array().map(Vec::len), Some(4));
        let warnings = dump["warnings"].as_array().expect("warnings");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].as_str().is_some_and(|w| w
                .starts_with("gateways.yml: Gateway istio-system/egress: spec.selector: selector")),
            "{warnings:?}"
        );
        assert_eq!(
            warnings[1],
            "policy.yml: RequestAuthentication shop/jwt: kind RequestAuthentication is not \
             implemented by this mesh: not enforced"
        );
    }

    /// What the config folder holds that is invalid is listed under `rejected`, each with its
    /// identity (when it has one), source, what of it is in force and diagnostics; the rest is
    /// in force.
    #[test]
    fn config_dump_lists_what_is_invalid_under_rejected() {
        let dir = tempfile::tempdir().expect("a folder");
        std::fs::write(dir.path().join("policy.yml"), POLICY).expect("written");
        let invalid =
            gateway("public", "{istio: ingressgateway}").replace("number: 80", "number: 0");
        std::fs::write(dir.path().join("gateway.yml"), invalid).expect("written");
        std::fs::write(dir.path().join("broken.yml"), "kind: [").expect("written");
        let store = Store::open(
            Some(dir.path().to_path_buf()),
            EngineSettings::default(),
            &mut Registry::default(),
        )
        .expect("started with what is valid");
        let dump = config_dump(&store);
        assert_eq!(dump["objects"].as_array().map(Vec::len), Some(1));
        let rejected = dump["rejected"].as_array().expect("rejected");
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        let file = |name: &str| dir.path().join(name).display().to_string();
        assert_eq!(rejected[0]["kind"], json!(null));
        assert_eq!(rejected[0]["source"], json!(file("broken.yml")));
        assert!(
            rejected[0]["diagnostics"][0].as_str().is_some_and(
                |d| d.starts_with(&format!("error: {}: invalid YAML", file("broken.yml")))
            ),
            "{rejected:?}"
        );
        assert_eq!(
            (
                &rejected[1]["kind"],
                &rejected[1]["namespace"],
                &rejected[1]["name"]
            ),
            (&json!("Gateway"), &json!("istio-system"), &json!("public"))
        );
        // Never seen valid (as at start-up): left out.
        assert_eq!(rejected[0]["outcome"], json!("left_out"));
        assert_eq!(rejected[1]["outcome"], json!("left_out"));
        assert_eq!(
            rejected[1]["diagnostics"],
            json!([format!(
                "error: {}: Gateway istio-system/public: spec.servers[0].port.number: port 0 is \
                 outside 1–65535",
                file("gateway.yml")
            )])
        );

        // The policy broken while the agent runs: its last good version stays, and says so.
        std::fs::write(
            dir.path().join("policy.yml"),
            POLICY.replace("spec: {}", "spec: ["),
        )
        .expect("written");
        store.reload().expect("reloaded");
        let dump = config_dump(&store);
        assert_eq!(dump["objects"].as_array().map(Vec::len), Some(1));
        let rejected = dump["rejected"].as_array().expect("rejected");
        let policy = rejected
            .iter()
            .find(|r| r["source"] == json!(file("policy.yml")))
            .expect("the policy's file rejected");
        assert_eq!(
            policy["outcome"],
            json!("last_good_in_force"),
            "{rejected:?}"
        );
    }

    /// `mesh-agent apply` prints them: the user who applies a policy learns it is not enforced.
    #[test]
    fn an_apply_answers_the_warnings_of_the_objects_it_brought_in() {
        let store = Store::open(None, EngineSettings::default(), &mut Registry::default())
            .expect("an empty store");
        let (status, answer) = change_answer(&store, store.apply("policy.yml", POLICY));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["objects"], json!(["RequestAuthentication shop/jwt"]));
        assert_eq!(
            answer["warnings"],
            json!(
                ["warning: policy.yml: RequestAuthentication shop/jwt: kind \
                    RequestAuthentication is not implemented by this mesh: not enforced"]
            )
        );
        let (_, answer) = change_answer(&store, store.delete("policy.yml", POLICY));
        assert_eq!(answer["warnings"], json!([]));
        assert_eq!(config_dump(&store)["ignored"], json!([]));
    }

    /// The access table of the module's documentation, in full.
    #[test]
    fn who_may_do_what_where() {
        use Access::{Probe, Read, Write};
        use Listener::{Socket, Tcp};
        use Mode::{Kubernetes, Local};
        let allowed = |mode, via, access| refusal(mode, via, access, "/run/a.sock").is_none();
        for (mode, via, access, expected) in [
            (Local, Socket, Probe, true),
            (Local, Socket, Read, true),
            (Local, Socket, Write, true),
            (Local, Tcp, Probe, true),
            (Local, Tcp, Read, true),
            (Local, Tcp, Write, false),
            (Kubernetes, Socket, Probe, true),
            (Kubernetes, Socket, Read, true),
            (Kubernetes, Socket, Write, false),
            (Kubernetes, Tcp, Probe, true),
            (Kubernetes, Tcp, Read, false),
            (Kubernetes, Tcp, Write, false),
        ] {
            assert_eq!(
                allowed(mode, via, access),
                expected,
                "{mode:?} {via:?} {access:?}"
            );
        }
        let why = refusal(Local, Tcp, Write, "/run/a.sock").unwrap();
        assert!(why.contains("/run/a.sock"), "{why}");
    }

    #[test]
    fn every_change_is_a_write_and_only_probes_are_probes() {
        for (method, path) in [
            (Method::POST, "/apply"),
            (Method::POST, "/delete"),
            (Method::POST, "/pods"),
            (Method::DELETE, "/pods/client"),
            (Method::PUT, "/logging"),
            (Method::POST, "/logging"),
            (Method::POST, "/healthz"),
            (Method::HEAD, "/ready"),
        ] {
            assert_eq!(access(&method, path), Access::Write, "{method} {path}");
        }
        for path in [
            "/healthz",
            "/ready",
            "/metrics",
            "/stats/prometheus",
            "/graph",
            "/graph.json",
        ] {
            assert_eq!(access(&Method::GET, path), Access::Probe, "{path}");
        }
        for path in [
            "/stats",
            "/pods",
            "/config_dump",
            "/clusters",
            "/logging",
            "/x",
        ] {
            assert_eq!(access(&Method::GET, path), Access::Read, "{path}");
        }
    }

    #[test]
    fn query_parameters_are_fully_decoded() {
        let uri: http::Uri = "/apply?x=1&file=deploy%2Fmy%20rules%26more%25.yml&file=second"
            .parse()
            .unwrap();
        assert_eq!(
            query_param(&uri, "file").as_deref(),
            Some("deploy/my rules&more%.yml")
        );
        let uri: http::Uri = "/logging?level=mesh_agent%3Ddebug,info".parse().unwrap();
        assert_eq!(
            query_param(&uri, "level").as_deref(),
            Some("mesh_agent=debug,info")
        );
        assert_eq!(query_param(&uri, "file"), None);
        assert_eq!(query_param(&"/logging".parse().unwrap(), "level"), None);
    }
}
