//! A fake Kubernetes API server for tests of the agent's Kubernetes mode.
//!
//! It speaks the real list/watch protocol over plain HTTP/1.1 — the one `kube::runtime::watcher`
//! drives: lists carry the global `resourceVersion`, watches stream newline-delimited
//! `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events after a version, and a version older than the
//! retained history gets the `410 Expired` `ERROR` event. Objects come from YAML fixtures and are
//! kept as untyped JSON, so any field the agent reads is whatever the fixture says.
//!
//! Like etcd, one resourceVersion counter spans all kinds. Istio kinds are served under every
//! version (`v1alpha3`, `v1beta1`, `v1`) with `apiVersion` rewritten, like a CRD without conversion.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let api = mesh_tests::kube_api::FakeApiServer::start("127.0.0.1:0".parse()?)?;
//! api.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")?;
//! api.kubeconfig(std::path::Path::new("/tmp/kubeconfig"))?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// Events kept for watches resuming from an older version; older ones get 410, as after an
/// etcd compaction.
const HISTORY_LIMIT: usize = 10_000;
/// Watches end after `timeoutSeconds`, capped like the real server's `--min-request-timeout`.
const MAX_WATCH_SECONDS: u64 = 300;
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// One kind the server knows: where it lives and how its lists are named.
struct ResourceType {
    group: &'static str,
    versions: &'static [&'static str],
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const ISTIO_VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];
#[rustfmt::skip]
const RESOURCES: &[ResourceType] = &[
    ResourceType { group: "", versions: &["v1"], plural: "namespaces", kind: "Namespace", namespaced: false },
    ResourceType { group: "", versions: &["v1"], plural: "services", kind: "Service", namespaced: true },
    ResourceType { group: "", versions: &["v1"], plural: "pods", kind: "Pod", namespaced: true },
    ResourceType { group: "discovery.k8s.io", versions: &["v1"], plural: "endpointslices", kind: "EndpointSlice", namespaced: true },
    ResourceType { group: "networking.istio.io", versions: ISTIO_VERSIONS, plural: "virtualservices", kind: "VirtualService", namespaced: true },
    ResourceType { group: "networking.istio.io", versions: ISTIO_VERSIONS, plural: "destinationrules", kind: "DestinationRule", namespaced: true },
    ResourceType { group: "networking.istio.io", versions: ISTIO_VERSIONS, plural: "gateways", kind: "Gateway", namespaced: true },
];

fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// Index into [`RESOURCES`] by kind ("Pod") or plural ("pods"), case-insensitively.
fn resource_by_name(name: &str) -> Result<usize> {
    RESOURCES
        .iter()
        .position(|r| r.kind.eq_ignore_ascii_case(name) || r.plural.eq_ignore_ascii_case(name))
        .ok_or_else(|| anyhow!("unknown kind {name:?}"))
}

#[derive(Clone, Copy, PartialEq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

struct Event {
    rv: u64,
    resource: usize,
    kind: EventType,
    object: Value,
    /// The state before a MODIFIED event, so a selector watch can turn it into ADDED or DELETED
    /// when the object enters or leaves the selection (as the real server does).
    old: Option<Value>,
}

type Key = (usize, String, String); // (resource, namespace, name)

#[derive(Default)]
struct Store {
    rv: u64,
    /// Every event after `floor` is in `history`; watching from before it is 410 Gone.
    floor: u64,
    history: VecDeque<Arc<Event>>,
    objects: BTreeMap<Key, Value>,
    next_uid: u64,
    unavailable: bool,
    requests: Vec<String>,
}

impl Store {
    fn record(&mut self, resource: usize, kind: EventType, object: Value, old: Option<Value>) {
        self.history.push_back(Arc::new(Event {
            rv: self.rv,
            resource,
            kind,
            object,
            old,
        }));
        if self.history.len() > HISTORY_LIMIT {
            self.floor = self.history.pop_front().map_or(self.floor, |e| e.rv);
        }
    }
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every change; watch streams wait on it. The epoch (second field) changes when
    /// open watches must end.
    changed: watch::Sender<(u64, u64)>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self, end_watches: bool) {
        let rv = self.store().rv;
        self.changed.send_modify(|(seen, epoch)| {
            *seen = rv;
            *epoch += u64::from(end_watches);
        });
    }
}

/// The fake API server; it stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Binds `listen` in the calling thread's network namespace, then serves from a thread of its own.
    pub fn start(listen: SocketAddr) -> Result<FakeApiServer> {
        let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            changed: watch::channel((0, 0)).0,
        });
        let (shutdown, stop) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || runtime.block_on(serve(listener, server, stop)))?;
        Ok(FakeApiServer {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig pointing at this server over plain HTTP, with a dummy token.
    pub fn kubeconfig(&self, path: &Path) -> Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or updates every object of a multi-document YAML (a `kind: List` is expanded).
    /// Re-applying an unchanged object is a no-op, as with `kubectl apply`.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        let mut objects = Vec::new();
        for document in yaml_serde::Deserializer::from_str(yaml) {
            match Value::deserialize(document).context("parsing YAML")? {
                Value::Null => {}
                Value::Object(list) if list.get("kind").and_then(Value::as_str) == Some("List") => {
                    objects.extend(
                        list.get("items")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .cloned(),
                    )
                }
                object => objects.push(object),
            }
        }
        let mut store = self.shared.store();
        for object in objects {
            apply(&mut store, object)?;
        }
        drop(store);
        self.shared.notify(false);
        Ok(())
    }

    /// Deletes an object (`kind` is "Pod" or "pods"; `namespace` is ignored for cluster-scoped kinds).
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<()> {
        let resource = resource_by_name(kind)?;
        let namespace = object_namespace(resource, namespace);
        let mut store = self.shared.store();
        let key = (resource, namespace.clone(), name.to_string());
        let Some(mut object) = store.objects.remove(&key) else {
            bail!("{kind} {namespace}/{name} not found");
        };
        store.rv += 1;
        object["metadata"]["resourceVersion"] = store.rv.to_string().into();
        store.record(resource, EventType::Deleted, object, None);
        drop(store);
        self.shared.notify(false);
        Ok(())
    }

    /// The stored object (for its server-assigned `uid`, say).
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let resource = resource_by_name(kind).ok()?;
        let key = (
            resource,
            object_namespace(resource, namespace),
            name.to_string(),
        );
        self.shared.store().objects.get(&key).cloned()
    }

    /// Ends every open watch stream; clients must re-watch.
    pub fn close_watches(&self) {
        self.shared.notify(true);
    }

    /// Forgets all past events, so watching from any older version gets 410 Gone.
    pub fn expire_history(&self) {
        let mut store = self.shared.store();
        store.history.clear();
        store.floor = store.rv;
        drop(store);
        self.shared.notify(false);
    }

    /// While down, every request gets 503 and open watches end.
    pub fn set_available(&self, up: bool) {
        self.shared.store().unavailable = !up;
        self.shared.notify(!up);
    }

    /// The requests served so far, as "GET /path?query" with the query decoded.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shutdown.take().map(|stop| stop.send(()));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The namespace part of a store key: "default" if unset, "" for cluster-scoped kinds.
fn object_namespace(resource: usize, namespace: Option<&str>) -> String {
    match RESOURCES[resource].namespaced {
        true => namespace.unwrap_or("default").to_string(),
        false => String::new(),
    }
}

/// Stores one object with server-assigned metadata and records its event.
fn apply(store: &mut Store, mut object: Value) -> Result<()> {
    let api_version = object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let resource = RESOURCES
        .iter()
        .position(|r| r.group == group && r.kind == kind && r.versions.contains(&version))
        .ok_or_else(|| anyhow!("unsupported object {api_version} {kind}"))?;
    let meta = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("{kind} without metadata"))?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .context("object without metadata.name")?
        .to_string();
    let namespace = if RESOURCES[resource].namespaced {
        let namespace = meta.entry("namespace").or_insert_with(|| "default".into());
        namespace.as_str().unwrap_or("default").to_string()
    } else {
        meta.remove("namespace");
        String::new()
    };
    let key = (resource, namespace, name);
    let old = store.objects.get(&key).cloned();
    // Server-owned fields survive updates; a fixture may pin `uid` (pods' cgroups are named by it).
    for field in ["uid", "creationTimestamp"] {
        if let Some(value) = old.as_ref().and_then(|o| o["metadata"].get(field)) {
            meta.insert(field.into(), value.clone());
        }
    }
    if !meta.contains_key("uid") {
        store.next_uid += 1;
        meta.insert(
            "uid".into(),
            format!("00000000-0000-4000-8000-{:012x}", store.next_uid).into(),
        );
    }
    meta.entry("creationTimestamp")
        .or_insert_with(|| now_rfc3339().into());
    if let Some(old) = &old {
        meta.insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        if *old == object {
            return Ok(());
        }
    }
    store.rv += 1;
    object["metadata"]["resourceVersion"] = store.rv.to_string().into();
    store.objects.insert(key, object.clone());
    let kind = if old.is_some() {
        EventType::Modified
    } else {
        EventType::Added
    };
    store.record(resource, kind, object, old);
    Ok(())
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // Howard Hinnant's civil_from_days, to avoid a date crate for one timestamp.
    let z = secs.div_euclid(86_400) + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let (day, month) = (
        doy - (153 * mp + 2) / 5 + 1,
        if mp < 10 { mp + 3 } else { mp - 9 },
    );
    let year = yoe + era * 400 + i64::from(month <= 2);
    let t = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

type ResponseBody = BoxBody<Bytes, Infallible>;

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = Arc::clone(&shared);
        let service = hyper::service::service_fn(move |request| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(handle(&shared, request)) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("valid header"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code.as_u16()})
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<ResponseBody> {
    json_response(code, &status(code, reason, message))
}

/// "GET /path?query" with the query decoded. kube sends `?&watch=true&...`; dropping empty
/// pairs lets a test match "GET /api/v1/pods?watch=true".
fn request_line(request: &Request<Incoming>) -> String {
    let query = request.uri().query().unwrap_or_default();
    let pairs: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let query = if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    };
    format!("{} {}{query}", request.method(), request.uri().path())
}

fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path().to_string();
    let query: BTreeMap<String, String> =
        request.uri().query().map(parse_query).unwrap_or_default();
    {
        let mut store = shared.store();
        store.requests.push(request_line(&request));
        if store.unavailable {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is currently unavailable",
            );
        }
    }
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "this fake server is read-only",
        );
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            return json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}),
            )
        }
        ["api"] => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            )
        }
        ["apis"] => return json_response(StatusCode::OK, &api_groups()),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return not_found(&path),
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .position(|r| r.group == group && r.plural == plural && r.versions.contains(&version))
    };
    // A cluster-scoped `namespaces/NAME` and a namespaced collection differ only by length.
    let (resource, namespace, name) = match *rest {
        [] => return resource_list(group, version),
        [plural] => (find(plural), None, None),
        ["namespaces", ns, plural] => (
            find(plural).filter(|&r| RESOURCES[r].namespaced),
            Some(ns),
            None,
        ),
        [plural, name] => (
            find(plural).filter(|&r| !RESOURCES[r].namespaced),
            None,
            Some(name),
        ),
        ["namespaces", ns, plural, name] => (
            find(plural).filter(|&r| RESOURCES[r].namespaced),
            Some(ns),
            Some(name),
        ),
        _ => (None, None, None),
    };
    let Some(resource) = resource else {
        return not_found(&path);
    };
    let selection = match Selection::new(resource, group_version(group, version), namespace, &query)
    {
        Ok(selection) => selection,
        Err(message) => return error(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    if let Some(name) = name {
        let key = (
            resource,
            namespace.unwrap_or("").to_string(),
            name.to_string(),
        );
        return match shared.store().objects.get(&key) {
            Some(object) => json_response(StatusCode::OK, &selection.serve(object)),
            None => not_found(&path),
        };
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return start_watch(shared, selection, &query);
    }
    list(&shared.store(), &selection, &query)
}

/// A list is "not older than" the version asked for, so only an exact-version list can be
/// too old (410), as after an etcd compaction.
fn list(
    store: &Store,
    selection: &Selection,
    query: &BTreeMap<String, String>,
) -> Response<ResponseBody> {
    let exact = query
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact");
    let requested: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    if exact && requested < store.floor {
        return error(StatusCode::GONE, "Expired", "too old resource version");
    }
    let items: Vec<Value> = selection.objects(store).collect();
    let list = json!({"apiVersion": selection.api_version, "kind": format!("{}List", RESOURCES[selection.resource].kind),
                      "metadata": {"resourceVersion": store.rv.to_string()}, "items": items});
    json_response(StatusCode::OK, &list)
}

fn not_found(path: &str) -> Response<ResponseBody> {
    error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("the server could not find the requested resource ({path})"),
    )
}

fn api_groups() -> Value {
    let groups: Vec<Value> = ["discovery.k8s.io", "networking.istio.io"]
        .iter()
        .map(|&name| {
            let versions: &[&str] = RESOURCES
                .iter()
                .find(|r| r.group == name)
                .map_or(&[], |r| r.versions);
            let versions: Vec<Value> = versions
                .iter()
                .rev() // preferred (newest) first, as the real server lists them
                .map(|v| json!({"groupVersion": group_version(name, v), "version": v}))
                .collect();
            json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Response<ResponseBody> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.versions.contains(&version))
        .map(|r| {
            json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                   "kind": r.kind, "verbs": ["get", "list", "watch"]})
        })
        .collect();
    if resources.is_empty() {
        return not_found(&format!("{group}/{version}"));
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version(group, version), "resources": resources}),
    )
}

/// What one list or watch asks for: kind, served version, namespace and selectors.
struct Selection {
    resource: usize,
    api_version: String,
    namespace: Option<String>,
    labels: Vec<LabelTerm>,
    fields: Vec<(String, bool, String)>, // (dotted path, equal?, value)
}

enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selection {
    fn new(
        resource: usize,
        api_version: String,
        namespace: Option<&str>,
        query: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut selection = Selection {
            resource,
            api_version,
            namespace: namespace.map(String::from),
            labels: Vec::new(),
            fields: Vec::new(),
        };
        for term in query
            .get("labelSelector")
            .map(|s| split_terms(s))
            .unwrap_or_default()
        {
            selection.labels.push(
                parse_label_term(&term)
                    .ok_or_else(|| format!("invalid label selector term {term:?}"))?,
            );
        }
        for term in query
            .get("fieldSelector")
            .map(|s| split_terms(s))
            .unwrap_or_default()
        {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else {
                let (f, v) = term
                    .split_once('=')
                    .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
                (f, true, v.strip_prefix('=').unwrap_or(v))
            };
            selection
                .fields
                .push((field.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(selection)
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| meta["namespace"] != ns)
        {
            return false;
        }
        let label = |key: &str| meta["labels"].get(key).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|term| match term {
            LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
        });
        // Fields are resolved generically by path; a missing field compares as "".
        let fields_match = self.fields.iter().all(|(path, equal, value)| {
            let found = path.split('.').try_fold(object, |v, part| v.get(part));
            (found.and_then(Value::as_str).unwrap_or("") == value) == *equal
        });
        labels_match && fields_match
    }

    /// The selected objects, as this request's version serves them.
    fn objects<'a>(&'a self, store: &'a Store) -> impl Iterator<Item = Value> + 'a {
        let selected = store
            .objects
            .iter()
            .filter(|((r, _, _), o)| *r == self.resource && self.matches(o));
        selected.map(|(_, object)| self.serve(object))
    }

    /// The current state as watch events, for a watch that starts from "any" version.
    fn current(&self, store: &Store) -> Vec<Bytes> {
        self.objects(store)
            .map(|object| watch_line("ADDED", &object))
            .collect()
    }

    /// The object as this request's version serves it.
    fn serve(&self, object: &Value) -> Value {
        let mut object = object.clone();
        object["apiVersion"] = self.api_version.clone().into();
        object
    }

    /// The event line this watch sends for `event`, if any.
    fn event_line(&self, event: &Event) -> Option<Bytes> {
        if event.resource != self.resource {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.old.as_ref().is_some_and(|old| self.matches(old));
        let kind = match (event.kind, before, now) {
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, true, false) | (EventType::Deleted, _, true) => "DELETED",
            (EventType::Modified | EventType::Added, false, true) => "ADDED",
            _ => return None,
        };
        Some(watch_line(kind, &self.serve(&event.object)))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let kind = RESOURCES[self.resource].kind;
        watch_line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": self.api_version, "metadata": metadata}),
        )
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

/// Splits a selector at top-level commas (`a in (x,y)` keeps its commas).
fn split_terms(selector: &str) -> Vec<String> {
    let (mut terms, mut current, mut depth) = (Vec::new(), String::new(), 0);
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_term(term: &str) -> Option<LabelTerm> {
    let set = |rest: &str| -> Option<Vec<String>> {
        let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some((key, value)) = term.split_once("!=") {
        return Some(LabelTerm::NotEquals(key.trim().into(), value.trim().into()));
    }
    if let Some((key, value)) = term.split_once('=') {
        let value = value.strip_prefix('=').unwrap_or(value);
        return Some(LabelTerm::Equals(key.trim().into(), value.trim().into()));
    }
    if let Some((key, rest)) = term.split_once(" notin ") {
        return Some(LabelTerm::NotIn(key.trim().into(), set(rest)?));
    }
    if let Some((key, rest)) = term.split_once(" in ") {
        return Some(LabelTerm::In(key.trim().into(), set(rest)?));
    }
    match term.strip_prefix('!') {
        Some(key) => Some(LabelTerm::NotExists(key.trim().into())),
        None => Some(LabelTerm::Exists(term.into())),
    }
}

/// The query's pairs, decoded (kube encodes `=` in selectors as `%3D`).
fn parse_query(query: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// A streaming response body fed by a channel; the stream ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    selection: Selection,
    query: &BTreeMap<String, String>,
) -> Response<ResponseBody> {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(MAX_WATCH_SECONDS);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let initial_events = query.get("sendInitialEvents").is_some_and(|b| b == "true");
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    let (sender, receiver) = mpsc::channel(64);
    let mut changes = shared.changed.subscribe();
    let epoch = changes.borrow_and_update().1;
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(timeout.min(MAX_WATCH_SECONDS));
        let mut bookmark_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        // Version "0" or none means "from any state": the current objects arrive as ADDED first.
        let mut seen = match from.parse::<u64>() {
            Ok(rv) if rv > 0 && !initial_events => rv,
            _ => {
                let (rv, mut lines) = {
                    let store = shared.store();
                    (store.rv, selection.current(&store))
                };
                if initial_events {
                    lines.push(selection.bookmark(rv, true));
                }
                for line in lines {
                    if sender.send(line).await.is_err() {
                        return;
                    }
                }
                rv
            }
        };
        loop {
            let (lines, expired) = {
                let store = shared.store();
                if changes.borrow_and_update().1 != epoch || store.unavailable {
                    return;
                }
                if seen < store.floor {
                    // The events since `seen` are gone: the client must list again.
                    let gone = status(StatusCode::GONE, "Expired", "too old resource version");
                    (vec![watch_line("ERROR", &gone)], true)
                } else {
                    let new = store.history.iter().filter(|e| e.rv > seen);
                    let lines = new.filter_map(|e| selection.event_line(e)).collect();
                    seen = seen.max(store.rv);
                    (lines, false)
                }
            };
            for line in lines {
                if sender.send(line).await.is_err() {
                    return;
                }
            }
            if expired {
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = bookmark_timer.tick(), if bookmarks => {
                    if sender.send(selection.bookmark(seen, false)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = sender.closed() => return, // the client went away
            }
        }
    });
    let mut response = Response::new(ChannelBody(receiver).boxed());
    response.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("valid header"),
    );
    response
}
