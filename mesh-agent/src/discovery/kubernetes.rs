//! Kubernetes mode's source: watches on the API server for `Service`, `EndpointSlice`, `Pod`,
//! `Namespace` (its mesh label only), Istio's `VirtualService`/`DestinationRule`/`Gateway`,
//! `AuthorizationPolicy` and `PeerAuthentication`, and the Gateway API's `HTTPRoute`,
//! `GRPCRoute` and `Gateway` where the API server serves them. Every event becomes a typed
//! [`SourceChange`] for the store — the object as the API gave it, never re-encoded — so engine
//! and proxy do not know the difference from local mode. `Pod` and `Namespace` are also kept in
//! reflector stores, which label enrollment reads.
//!
//! `EndpointSlice` is read at the version the API server serves, found by API discovery:
//! `discovery.k8s.io/v1` (Kubernetes 1.21 and later) or `v1beta1` (1.17 to 1.24), whose objects
//! are read into the v1 type (see [`endpoint_slice_from_v1beta1`]).
//!
//! The Gateway API kinds ([`GATEWAY_API_KINDS`]) are CRDs a cluster may not have
//! (deploy/gateway-api or upstream's): the same API discovery finds which of them are served at
//! `v1`, and only those are watched; a watched one's first list is awaited like the Istio kinds'.
//! The store keys them as `Kind.gateway.networking.k8s.io`, as `kubectl` names them, so that a
//! Gateway API `Gateway` is not Istio's `Gateway`; their watches (relists, metrics, `/ready`) use
//! that name too. A kind installed after the agent started is read once the agent restarts.
//!
//! The Istio kinds the mesh does not implement ([`NOT_IMPLEMENTED`]: `RequestAuthentication`,
//! `ServiceEntry`, ...) are watched too, only so that each one applied is
//! reported (a warning, `/config_dump`'s `ignored`) instead of passing unnoticed. Their CRDs may
//! well not be installed: only the kinds the API server serves at start-up are watched, and
//! they never hold up start-up.
//!
//! Start-up waits as long as it takes for API discovery and every watch's first list, and
//! `/ready` names what it is still waiting for (see [`Readiness`]); the agent never gives up and
//! exits, which under a kubelet would only be a restart loop. Watches recover by themselves
//! (backoff, relist on 410; a relist replaces the kind's objects as a whole); until they do, the
//! last good state stays in force and traffic keeps flowing. The first failure of a streak is
//! logged with its kind and reason, every one is counted
//! (`mesh_kubernetes_watch_failures_total{kind}`), and recovery is logged.
//!
//! An Istio or Gateway API object that fails validation (the CRDs' schemas take almost any `spec`)
//! is rejected by itself — its last good version stays in force, or, if this agent saw none, it is
//! left out; everything else keeps updating, and a relist keeps that last good version too — and
//! reported by the store (log, metric, `/config_dump`) and here as a `Warning` Event on the object
//! (reason `Rejected`, the problems in its note), which `kubectl describe` shows. Every node's
//! agent validates the same objects, so the Event's name is derived from the object's name and
//! `resourceVersion`: the first agent creates it, the others find it there (`409`), and one bad
//! version makes one Event, needing only `create` on `events`. Which version an agent keeps in
//! force is its own (one started after the bad version has none), so the Event's note says both.

use std::{fmt::Debug, future::Future, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures_util::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, ObjectReference, Pod, Service},
        discovery::v1::EndpointSlice,
        events::v1::Event as K8sEvent,
    },
    apimachinery::pkg::apis::meta::v1::{APIResourceList, MicroTime, ObjectMeta},
};
use kube::{
    api::{ApiResource, DynamicObject, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{verbs, Discovery},
    runtime::{
        reflector::{self, store::Writer, ObjectRef, Store},
        watcher::{self, Event},
        WatchStreamExt,
    },
    Api, Client, Config,
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::{
    config::{self, Diagnostic, Document, Object, ObjectKey, Rejection, Sourced},
    readiness::Readiness,
};

/// What the watches report to the store.
#[derive(Debug)]
pub enum SourceChange {
    /// This object is new or changed.
    Upsert(Arc<Sourced>),
    /// This object is new or changed, and invalid: reported, and its last good version stays
    /// (none: left out).
    Reject(Rejection),
    /// This object is gone.
    Remove(ObjectKey),
    /// These are all the objects of this kind (after a (re)list), valid (`objects`) and invalid
    /// (`rejected`: as [`SourceChange::Reject`], their last good versions stay): any other is
    /// gone.
    Replace {
        kind: Arc<str>,
        objects: Vec<Arc<Sourced>>,
        rejected: Vec<Rejection>,
    },
}

/// What a watched object reads as: an object for the store, a rejection (an Istio object that
/// fails validation, an object not understood), or `None` for one without a name (nothing to
/// know it by).
type Read = Option<Result<Arc<Sourced>, Rejection>>;

/// How objects from the API server are labelled in diagnostics and `/config_dump`.
const ORIGIN: &str = "kubernetes";
/// Events waiting for the store; a watch waits when it is full.
const CHANGES_BOUND: usize = 4096;
/// How often start-up says it is still waiting for the API server.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(30);
/// API discovery is retried with this backoff, doubling up to the cap.
const DISCOVERY_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

pub struct KubeSettings {
    /// Kubeconfig file; none: in-cluster service account, or `$KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// This node: only its pods are enrolled.
    pub node_name: String,
    /// The host's `/proc` (mounted at `/host/proc` in the DaemonSet).
    pub proc_root: PathBuf,
}

const ISTIO_KINDS: [(&str, &str, &str); 5] = [
    ("networking.istio.io", "VirtualService", "virtualservices"),
    ("networking.istio.io", "DestinationRule", "destinationrules"),
    ("networking.istio.io", "Gateway", "gateways"),
    (
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
    ),
];
/// The version every Istio release's CRDs serve, for both groups.
const ISTIO_VERSION: &str = "v1beta1";
const DISCOVERY_GROUP: &str = "discovery.k8s.io";
const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The version the Gateway API kinds are read at: `HTTPRoute` and `Gateway` are `v1` from
/// Gateway API 1.0 on, `GRPCRoute` from 1.1 on.
const GATEWAY_API_VERSION: &str = "v1";

/// A Gateway API kind the mesh reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GatewayApiKind {
    kind: &'static str,
    plural: &'static str,
    /// The kind as the store keys it (`ObjectKey::of`: `Kind.group`), which is also its watch's
    /// name: a relist replaces exactly the store's objects of that kind.
    keyed_as: &'static str,
}

impl GatewayApiKind {
    fn resource(self) -> ApiResource {
        ApiResource {
            group: GATEWAY_API_GROUP.into(),
            version: GATEWAY_API_VERSION.into(),
            api_version: format!("{GATEWAY_API_GROUP}/{GATEWAY_API_VERSION}"),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }
}

/// The Gateway API kinds the mesh reads, watched where the API server serves them: each needs
/// its `list`/`watch` grant in `deploy/base/clusterrole.yaml`.
const GATEWAY_API_KINDS: [GatewayApiKind; 3] = [
    GatewayApiKind {
        kind: "HTTPRoute",
        plural: "httproutes",
        keyed_as: "HTTPRoute.gateway.networking.k8s.io",
    },
    GatewayApiKind {
        kind: "GRPCRoute",
        plural: "grpcroutes",
        keyed_as: "GRPCRoute.gateway.networking.k8s.io",
    },
    GatewayApiKind {
        kind: "Gateway",
        plural: "gateways",
        keyed_as: "Gateway.gateway.networking.k8s.io",
    },
];

/// The failures of every watch, by kind.
#[derive(Clone, Default)]
pub struct WatchMetrics {
    failures: Family<[(&'static str, &'static str); 1], Counter>,
}

impl WatchMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "watch_failures",
            "Failed list or watch requests to the API server, by kind (the first of a streak is logged)",
            self.failures.clone(),
        );
    }

    fn of(&self, kind: &'static str) -> Counter {
        self.failures.get_or_create(&[("kind", kind)]).clone()
    }
}

/// The kinds of Istio's API groups the mesh does not implement, as (group, kind, plural): each
/// needs its own `list`/`watch` grant in `deploy/base/clusterrole.yaml` (no wildcards there).
pub const NOT_IMPLEMENTED: [(&str, &str, &str); 9] = [
    ("networking.istio.io", "ServiceEntry", "serviceentries"),
    ("networking.istio.io", "Sidecar", "sidecars"),
    ("networking.istio.io", "EnvoyFilter", "envoyfilters"),
    ("networking.istio.io", "WorkloadEntry", "workloadentries"),
    ("networking.istio.io", "WorkloadGroup", "workloadgroups"),
    ("networking.istio.io", "ProxyConfig", "proxyconfigs"),
    (
        "security.istio.io",
        "RequestAuthentication",
        "requestauthentications",
    ),
    ("telemetry.istio.io", "Telemetry", "telemetries"),
    ("extensions.istio.io", "WasmPlugin", "wasmplugins"),
];

/// The running watches.
pub struct Watches {
    /// Every watch's first list (and whatever followed while the others were listing): put
    /// it in force before the agent says it is ready.
    pub initial: Vec<SourceChange>,
    /// Everything after, for [`Store::follow`](crate::state::Store::follow).
    pub changes: mpsc::Receiver<SourceChange>,
    /// Every pod, for enrollment.
    pub pods: Store<Pod>,
    /// Every namespace (its labels enroll its pods), for enrollment.
    pub namespaces: Store<Namespace>,
    /// Notified when a pod or a namespace changed.
    pub enrollment_changed: Arc<Notify>,
}

/// Starts the watches and waits, as long as it takes, for API discovery and each one's first
/// list; meanwhile `readiness` names what is still awaited and why.
pub async fn start(client: Client, readiness: &Arc<Readiness>, metrics: &WatchMetrics) -> Watches {
    let Served {
        endpoint_slices,
        gateway_api,
    } = discover(&client, readiness).await;
    let (sender, mut changes) = mpsc::channel(CHANGES_BOUND);
    let (listed, mut lists) = watch::channel(0usize);
    let listed = Arc::new(listed);
    let enrollment_changed = Arc::new(Notify::new());
    let origin: Arc<str> = ORIGIN.into();
    let events = EventReporter::start(client.clone());

    let watch = |kind: &'static str| Watch {
        kind,
        sender: sender.clone(),
        listed: Some(Arc::clone(&listed)),
        origin: Arc::clone(&origin),
        failures: Failures::awaited(kind, readiness, metrics),
    };
    let mut kinds = 0;
    tokio::spawn(
        watch("Service").run(plain(Api::<Service>::all(client.clone())), |o| {
            Some(Object::Service(Arc::new(o)))
        }),
    );
    match endpoint_slices {
        EndpointSliceVersion::V1 => tokio::spawn(
            watch("EndpointSlice").run(plain(Api::<EndpointSlice>::all(client.clone())), |o| {
                Some(Object::EndpointSlice(Arc::new(o)))
            }),
        ),
        EndpointSliceVersion::V1beta1 => {
            let resource = ApiResource {
                group: DISCOVERY_GROUP.into(),
                version: "v1beta1".into(),
                api_version: EndpointSliceVersion::V1beta1.api_version().into(),
                kind: "EndpointSlice".into(),
                plural: "endpointslices".into(),
            };
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            tokio::spawn(watch("EndpointSlice").run(plain(api), |o| {
                Some(Object::EndpointSlice(Arc::new(
                    endpoint_slice_from_v1beta1(o)?,
                )))
            }))
        }
    };
    kinds += 2;
    let (pods, pod_events) = reflect(Api::<Pod>::all(client.clone()), &enrollment_changed);
    let pod_store = pods.clone();
    tokio::spawn(watch("Pod").run(pod_events, move |pod: Pod| {
        // The reflector holds the pod already: share it rather than keep a second copy.
        let shared = pod_store.get(&ObjectRef::from_obj(&pod));
        Some(Object::Pod(shared.unwrap_or_else(|| Arc::new(pod))))
    }));
    kinds += 1;
    for (group, kind, plural) in ISTIO_KINDS {
        let resource = ApiResource {
            group: group.into(),
            version: ISTIO_VERSION.into(),
            api_version: format!("{group}/{ISTIO_VERSION}"),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let events = events.clone();
        tokio::spawn(watch(kind).run_sourced(plain(api), move |object| {
            read_dynamic(&resource, object, Some(&events))
        }));
        kinds += 1;
    }
    kinds += watch_gateway_api(&client, &gateway_api, watch, Some(&events));
    let reported = watch_not_implemented(&client, &sender, &origin, metrics).await;
    if !reported.is_empty() {
        info!(
            kinds = reported.join(", "),
            "watching Istio kinds this mesh does not implement, to report them"
        );
    }
    let (namespaces, namespace_events) =
        reflect(Api::<Namespace>::all(client.clone()), &enrollment_changed);
    // Discovery reads a namespace's mesh label (whether its pods are in the mesh, so tunnelled
    // to); enrollment reads the reflector's copy.
    let namespace_origin = Arc::clone(&origin);
    tokio::spawn(
        watch("Namespace").run_sourced(namespace_events, move |namespace: Namespace| {
            let key = key_of("Namespace", &namespace)?;
            let value = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": namespace.metadata.name,
                    "labels": namespace.metadata.labels,
                },
            });
            Some(Ok(Arc::new(Sourced {
                key,
                origin: Arc::clone(&namespace_origin),
                object: Object::Other(Arc::new(value)),
                warnings: Vec::new(),
            })))
        }),
    );
    kinds += 1;

    // Keep taking changes while waiting, so a watch that is done listing never blocks on a
    // full channel while another one is still listing.
    let mut initial = Vec::new();
    {
        let first_lists = async {
            loop {
                tokio::select! {
                    Some(change) = changes.recv() => initial.push(change),
                    _ = lists.wait_for(|&n| n >= kinds) => break,
                }
            }
            let _ = namespaces.wait_until_ready().await;
            while let Ok(change) = changes.try_recv() {
                initial.push(change);
            }
        };
        tokio::pin!(first_lists);
        while tokio::time::timeout(STILL_WAITING_EVERY, &mut first_lists)
            .await
            .is_err()
        {
            let waiting = readiness.check().err().unwrap_or_default();
            warn!(%waiting, "still waiting for the API server's first lists: not ready");
        }
    }
    Watches {
        initial,
        changes,
        pods,
        namespaces,
        enrollment_changed,
    }
}

/// The EndpointSlice versions this agent reads, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndpointSliceVersion {
    V1,
    V1beta1,
}

impl EndpointSliceVersion {
    fn api_version(self) -> &'static str {
        match self {
            EndpointSliceVersion::V1 => "discovery.k8s.io/v1",
            EndpointSliceVersion::V1beta1 => "discovery.k8s.io/v1beta1",
        }
    }
}

/// What API discovery found at start-up.
#[derive(Debug)]
struct Served {
    endpoint_slices: EndpointSliceVersion,
    /// The Gateway API kinds served at [`GATEWAY_API_VERSION`]: only these are watched.
    gateway_api: Vec<GatewayApiKind>,
}

/// Asks the API server which EndpointSlice version it serves and which Gateway API kinds, until
/// it answers with an EndpointSlice version this agent reads.
async fn discover(client: &Client, readiness: &Readiness) -> Served {
    const AWAITED: &str = "API discovery";
    readiness.waiting(
        AWAITED,
        format!("asking which {DISCOVERY_GROUP} and {GATEWAY_API_GROUP} versions are served"),
    );
    let mut backoff = DISCOVERY_RETRY.0;
    let mut failing = false;
    loop {
        match ask_served(client).await {
            Ok((served, gateway_api_versions)) => {
                info!(
                    api_version = served.endpoint_slices.api_version(),
                    "reading EndpointSlice at the version the API server serves"
                );
                log_gateway_api(&gateway_api_versions, &served.gateway_api);
                readiness.done(AWAITED);
                return served;
            }
            Err(reason) => {
                if !failing {
                    warn!(%reason, "API discovery failed; retrying with backoff, not ready until it answers");
                    failing = true;
                }
                readiness.waiting(AWAITED, format!("last error: {reason}"));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(DISCOVERY_RETRY.1);
    }
}

/// One round of API discovery: what is served, and the Gateway API group's versions (for the
/// log).
async fn ask_served(client: &Client) -> Result<(Served, Vec<String>), String> {
    let groups = client.list_api_groups().await.map_err(|e| e.to_string())?;
    let versions = |name: &str| -> Vec<String> {
        groups
            .groups
            .iter()
            .filter(|group| group.name == name)
            .flat_map(|group| group.versions.iter().map(|v| v.version.clone()))
            .collect()
    };
    let endpoint_slices = choose_endpoint_slice_version(&versions(DISCOVERY_GROUP))?;
    let gateway_api_versions = versions(GATEWAY_API_GROUP);
    let gateway_api = if gateway_api_versions
        .iter()
        .any(|v| v == GATEWAY_API_VERSION)
    {
        let group_version = format!("{GATEWAY_API_GROUP}/{GATEWAY_API_VERSION}");
        match client.list_api_group_resources(&group_version).await {
            Ok(resources) => choose_gateway_api_kinds(&resources),
            // Its CRDs were deleted since: as if it had not been listed.
            Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
            Err(error) => return Err(format!("{group_version}: {error}")),
        }
    } else {
        Vec::new()
    };
    let served = Served {
        endpoint_slices,
        gateway_api,
    };
    Ok((served, gateway_api_versions))
}

/// The kinds of [`GATEWAY_API_KINDS`] among the served `resources` that can be listed and
/// watched, in that order.
fn choose_gateway_api_kinds(resources: &APIResourceList) -> Vec<GatewayApiKind> {
    GATEWAY_API_KINDS
        .into_iter()
        .filter(|kind| {
            resources.resources.iter().any(|resource| {
                resource.name == kind.plural
                    && resource.kind == kind.kind
                    && [verbs::LIST, verbs::WATCH]
                        .iter()
                        .all(|verb| resource.verbs.iter().any(|v| v == verb))
            })
        })
        .collect()
}

/// Says once, at start-up, which Gateway API kinds are read and why the others are not.
fn log_gateway_api(versions: &[String], watched: &[GatewayApiKind]) {
    let names = |kinds: &mut dyn Iterator<Item = GatewayApiKind>| {
        kinds.map(|kind| kind.kind).collect::<Vec<_>>().join(", ")
    };
    let all = names(&mut GATEWAY_API_KINDS.into_iter());
    if versions.is_empty() {
        info!(
            kinds = all,
            "the API server does not serve {GATEWAY_API_GROUP}: no Gateway API object is read \
             (install deploy/gateway-api or upstream's CRDs, then restart the agents)"
        );
        return;
    }
    if !watched.is_empty() {
        info!(
            kinds = names(&mut watched.iter().copied()),
            "watching the Gateway API kinds the API server serves at {GATEWAY_API_VERSION}"
        );
    }
    let missing = names(
        &mut GATEWAY_API_KINDS
            .into_iter()
            .filter(|kind| !watched.contains(kind)),
    );
    if !missing.is_empty() {
        info!(
            kinds = missing,
            served_versions = versions.join(", "),
            "Gateway API kinds not served at {GATEWAY_API_GROUP}/{GATEWAY_API_VERSION} (Gateway \
             API 1.0 or later; GRPCRoute 1.1): not read"
        );
    }
}

fn choose_endpoint_slice_version(served: &[String]) -> Result<EndpointSliceVersion, String> {
    if served.iter().any(|v| v == "v1") {
        Ok(EndpointSliceVersion::V1)
    } else if served.iter().any(|v| v == "v1beta1") {
        Ok(EndpointSliceVersion::V1beta1)
    } else {
        Err(format!(
            "the API server serves no EndpointSlice this agent reads ({DISCOVERY_GROUP} v1 or \
             v1beta1, served from Kubernetes 1.17 on); it serves {served:?}"
        ))
    }
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice read into the v1 type. What the mesh reads is the
/// same in both; v1beta1's `topology` labels become v1's `nodeName` and `zone`, as the API
/// server itself converts them.
fn endpoint_slice_from_v1beta1(object: DynamicObject) -> Option<EndpointSlice> {
    let mut value = serde_json::to_value(object).ok()?;
    value["apiVersion"] = json!(EndpointSliceVersion::V1.api_version());
    value["kind"] = json!("EndpointSlice");
    if let Some(endpoints) = value.get_mut("endpoints").and_then(Value::as_array_mut) {
        for endpoint in endpoints {
            let Some(topology) = endpoint.as_object_mut().and_then(|e| e.remove("topology")) else {
                continue;
            };
            if let Some(node) = topology.get("kubernetes.io/hostname") {
                endpoint["nodeName"] = node.clone();
            }
            if let Some(zone) = topology.get("topology.kubernetes.io/zone") {
                endpoint["zone"] = zone.clone();
            }
        }
    }
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    serde_json::from_value(value)
        .inspect_err(
            |error| warn!(%name, %error, "EndpointSlice (v1beta1) not understood: rejected"),
        )
        .ok()
}

/// The API server's client, from the kubeconfig given or the usual places.
pub async fn client(settings: &KubeSettings) -> Result<Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Starts the watch of each Gateway API kind in `served`, made by `watch` from the kind as the
/// store keys it; their objects are read as a file's. Returns how many.
fn watch_gateway_api(
    client: &Client,
    served: &[GatewayApiKind],
    watch: impl Fn(&'static str) -> Watch,
    events: Option<&EventReporter>,
) -> usize {
    for kind in served {
        let resource = kind.resource();
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let events = events.cloned();
        tokio::spawn(watch(kind.keyed_as).run_sourced(plain(api), move |object| {
            read_dynamic(&resource, object, events.as_ref())
        }));
    }
    served.len()
}

/// Watches each kind of [`NOT_IMPLEMENTED`] the API server serves (at its most stable version);
/// returns the kinds watched. Their first lists are not waited for.
async fn watch_not_implemented(
    client: &Client,
    sender: &mpsc::Sender<SourceChange>,
    origin: &Arc<str>,
    metrics: &WatchMetrics,
) -> Vec<&'static str> {
    let mut groups: Vec<&str> = NOT_IMPLEMENTED.iter().map(|(group, _, _)| *group).collect();
    groups.dedup();
    let discovery = match Discovery::new(client.clone()).filter(&groups).run().await {
        Ok(discovery) => discovery,
        Err(error) => {
            warn!(%error, "cannot discover Istio's API groups: the Istio kinds this mesh does not implement are not watched, so not reported");
            return Vec::new();
        }
    };
    let mut watched = Vec::new();
    for group in discovery.groups() {
        for (resource, capabilities) in group.resources_by_stability() {
            let known = NOT_IMPLEMENTED.iter().find(|(group, kind, plural)| {
                *group == resource.group && *kind == resource.kind && *plural == resource.plural
            });
            let Some(&(_, kind, _)) = known else {
                continue; // not granted by the ClusterRole
            };
            if !capabilities.supports_operation(verbs::WATCH) {
                continue;
            }
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let watch = Watch {
                kind,
                sender: sender.clone(),
                listed: None,
                origin: Arc::clone(origin),
                failures: Failures::reported(kind, metrics),
            };
            tokio::spawn(watch.run_sourced(plain(api), move |object| {
                read_dynamic(&resource, object, None)
            }));
            watched.push(kind);
        }
    }
    watched.sort_unstable();
    watched
}

type Events<K> = std::pin::Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// `kubectl apply`'s copy of what it last applied: a second copy of the object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the API server and `kubectl` keep for their own bookkeeping and nothing here
/// reads: `managedFields` (a JSON tree per field manager) and `kubectl apply`'s copy of the
/// object. Often more than half of an object as served; a node's agent holds every Pod,
/// Service and EndpointSlice of the cluster.
fn forget_bookkeeping<K: kube::Resource>(object: &mut K) {
    let metadata = object.meta_mut();
    metadata.managed_fields = None;
    if let Some(annotations) = &mut metadata.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

/// A watch that retries with backoff forever.
fn plain<K>(api: Api<K>) -> Events<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Debug + Send + 'static,
{
    Box::pin(
        watcher::watcher(api, watcher::Config::default())
            .modify(forget_bookkeeping)
            .default_backoff(),
    )
}

/// A watch whose objects are also kept in a reflector store; each event notifies `changed`.
fn reflect<K>(api: Api<K>, changed: &Arc<Notify>) -> (Store<K>, Events<K>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let writer = Writer::default();
    let store = writer.as_reader();
    let changed = Arc::clone(changed);
    let watch = watcher::watcher(api, watcher::Config::default()).modify(forget_bookkeeping);
    let events = reflector::reflector(writer, watch)
        .default_backoff()
        .inspect(move |event| {
            if event.is_ok() {
                changed.notify_one();
            }
        });
    (store, Box::pin(events))
}

/// One kind's watch, turning its events into changes for the store.
struct Watch {
    /// The kind as the store keys its objects (`ObjectKey::of`: `Kind.group` outside the core,
    /// `discovery.k8s.io` and Istio's groups): a relist replaces the objects of this kind, a
    /// deletion removes this kind's object, and metrics and `/ready` name it so.
    kind: &'static str,
    sender: mpsc::Sender<SourceChange>,
    /// Counts the watches that sent their first list; `None` for a watch start-up does not
    /// wait for.
    listed: Option<Arc<watch::Sender<usize>>>,
    origin: Arc<str>,
    failures: Failures,
}

/// One watch's failures: the first of a streak is logged with the kind and the reason, every
/// one is counted, recovery is logged; until the first list, `/ready` shows the last reason.
struct Failures {
    kind: &'static str,
    counter: Counter,
    /// Until the first list, for the watches start-up waits for.
    awaited: Option<(Arc<Readiness>, String)>,
    failing: bool,
}

impl Failures {
    /// A watch start-up waits for: not ready until its first list.
    fn awaited(kind: &'static str, readiness: &Arc<Readiness>, metrics: &WatchMetrics) -> Failures {
        let what = format!("first list of {kind}");
        readiness.waiting(&what, "listing");
        Failures {
            kind,
            counter: metrics.of(kind),
            awaited: Some((Arc::clone(readiness), what)),
            failing: false,
        }
    }

    /// A watch that only reports what it sees; readiness does not wait for it.
    fn reported(kind: &'static str, metrics: &WatchMetrics) -> Failures {
        Failures {
            kind,
            counter: metrics.of(kind),
            awaited: None,
            failing: false,
        }
    }

    fn failed(&mut self, error: &watcher::Error) {
        self.counter.inc();
        if let Some((readiness, what)) = &self.awaited {
            readiness.waiting(what, format!("last error: {error}"));
        }
        if self.failing {
            debug!(kind = self.kind, %error, "watch failed again; retrying");
        } else {
            warn!(kind = self.kind, %error, "watch failed; retrying with backoff, the last good state stays (later failures are counted, not logged, until it recovers)");
            self.failing = true;
        }
    }

    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            info!(kind = self.kind, "watch recovered");
        }
    }

    fn listed(&mut self) {
        self.recovered();
        if let Some((readiness, what)) = self.awaited.take() {
            readiness.done(&what);
        }
    }
}

impl Watch {
    /// For kinds that arrive typed: the object needs no validation.
    fn run<K>(
        self,
        events: Events<K>,
        typed: impl Fn(K) -> Option<Object> + Send + 'static,
    ) -> impl Future<Output = ()> + Send
    where
        K: kube::Resource + Send + 'static,
    {
        let origin = Arc::clone(&self.origin);
        let kind = self.kind;
        self.run_sourced(events, move |object| {
            let key = key_of(kind, &object)?;
            match typed(object) {
                Some(object) => Sourced::typed(&origin, object).map(|o| Ok(Arc::new(o))),
                // Why is logged where it failed; like an invalid object's, the last good
                // version stays.
                None => Some(Err(Rejection {
                    origin: Arc::clone(&origin),
                    diagnostics: vec![Diagnostic::error(
                        ORIGIN,
                        &key.to_string(),
                        format!("cannot be read as {kind}"),
                    )],
                    key: Some(key),
                })),
            }
        })
    }

    /// The store's key of a watched object; `None` for one without a name.
    fn key_of(&self, object: &impl kube::Resource) -> Option<ObjectKey> {
        key_of(self.kind, object)
    }

    async fn run_sourced<K>(
        mut self,
        mut events: Events<K>,
        read: impl Fn(K) -> Read + Send + 'static,
    ) where
        K: kube::Resource + Send + 'static,
    {
        // Objects of a (re)list are turned into changes only when the list is complete, so a
        // reflector behind `events` already holds them (see the `Pod` watch).
        let mut listing: Option<Vec<K>> = None;
        let mut first = true;
        while let Some(event) = events.next().await {
            // `Init` only says a (re)list starts: whether it succeeds is what follows.
            if matches!(event, Ok(ref e) if !matches!(e, Event::Init)) {
                self.failures.recovered();
            }
            let change = match event {
                Ok(Event::Init) => {
                    listing = Some(Vec::new());
                    continue;
                }
                Ok(Event::InitApply(object)) => {
                    listing.get_or_insert_default().push(object);
                    continue;
                }
                Ok(Event::InitDone) => {
                    let mut objects = Vec::new();
                    let mut rejected = Vec::new();
                    for object in listing.take().unwrap_or_default() {
                        match read(object) {
                            Some(Ok(object)) => objects.push(object),
                            Some(Err(rejection)) => rejected.push(rejection),
                            None => {}
                        }
                    }
                    SourceChange::Replace {
                        kind: self.kind.into(),
                        objects,
                        rejected,
                    }
                }
                Ok(Event::Apply(object)) => match read(object) {
                    Some(Ok(object)) => SourceChange::Upsert(object),
                    Some(Err(rejection)) => SourceChange::Reject(rejection),
                    None => continue,
                },
                Ok(Event::Delete(object)) => match self.key_of(&object) {
                    Some(key) => SourceChange::Remove(key),
                    None => continue,
                },
                Err(error) => {
                    self.failures.failed(&error);
                    continue;
                }
            };
            let replaced = matches!(change, SourceChange::Replace { .. });
            if self.sender.send(change).await.is_err() {
                return; // the agent is shutting down
            }
            if replaced && std::mem::take(&mut first) {
                self.failures.listed();
                if let Some(listed) = &self.listed {
                    listed.send_modify(|n| *n += 1);
                }
            }
        }
    }
}

/// The store's key of a watched object of `kind` (as the store keys that kind: see
/// [`Watch::kind`]); `None` for one without a name.
fn key_of(kind: &str, object: &impl kube::Resource) -> Option<ObjectKey> {
    let metadata = object.meta();
    let name = metadata.name.as_deref()?;
    Some(ObjectKey::new(kind, metadata.namespace.as_deref(), name))
}

/// An object of a CRD (Istio's kinds, the Gateway API's) as the API served it, read and
/// validated like a file's (a kind the mesh does not implement is kept with its warning). An
/// invalid one is a rejection, keyed as the store keys its kind and reported on the object
/// through `events` (when given).
fn read_dynamic(
    resource: &ApiResource,
    object: DynamicObject,
    events: Option<&EventReporter>,
) -> Read {
    let metadata = serde_json::to_value(&object.metadata).ok()?;
    let value = json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": metadata,
        "spec": object.data.get("spec").cloned().unwrap_or(Value::Null),
    });
    let document = Document {
        location: String::new(),
        value,
    };
    match config::read(ORIGIN, document) {
        Ok(sourced) => Some(Ok(Arc::new(sourced))),
        Err(diagnostics) => {
            let key = ObjectKey::of(
                &resource.api_version,
                &resource.kind,
                object.metadata.namespace.as_deref(),
                object.metadata.name.as_deref()?,
            );
            if let Some(events) = events {
                events.rejected(resource, &object.metadata, &diagnostics);
            }
            Some(Err(Rejection {
                origin: ORIGIN.into(),
                key: Some(key),
                diagnostics,
            }))
        }
    }
}

/// Who reports rejected objects as Events (`reportingController`).
const EVENT_CONTROLLER: &str = "sidecarless.io/mesh-agent";
/// Events waiting to be created; more are dropped (and logged), never waited for.
const EVENTS_BOUND: usize = 256;
/// The Events API caps a note at 1 kB.
const MAX_NOTE: usize = 1024;
/// An object name is at most 253 characters; so is the Event's name made from it.
const MAX_NAME: usize = 253;

/// Creates the Events that report rejected objects, off the watches' path: a watch hands an
/// Event over and goes on.
#[derive(Clone)]
struct EventReporter {
    sender: mpsc::Sender<K8sEvent>,
    /// `reportingInstance`: this node.
    instance: Arc<str>,
}

impl EventReporter {
    fn start(client: Client) -> EventReporter {
        let (sender, mut queued) = mpsc::channel::<K8sEvent>(EVENTS_BOUND);
        tokio::spawn(async move {
            while let Some(event) = queued.recv().await {
                let namespace = event.metadata.namespace.clone().unwrap_or_default();
                let api = Api::<K8sEvent>::namespaced(client.clone(), &namespace);
                match api.create(&PostParams::default(), &event).await {
                    Ok(_) => debug!(name = ?event.metadata.name, "event created"),
                    // Another node's agent reported this very version first.
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(error) => warn!(
                        %error,
                        object = ?event.regarding.as_ref().and_then(|r| r.name.as_deref()),
                        "cannot create the Event that reports a rejected object (needs create on events.k8s.io events)"
                    ),
                }
            }
        });
        let instance = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "mesh-agent".to_owned());
        EventReporter {
            sender,
            instance: instance.into(),
        }
    }

    /// Reports that the object was rejected for `diagnostics`.
    fn rejected(&self, resource: &ApiResource, metadata: &ObjectMeta, diagnostics: &[Diagnostic]) {
        let Some(event) = rejection_event(resource, metadata, diagnostics, &self.instance) else {
            return;
        };
        if self.sender.try_send(event).is_err() {
            warn!(
                object = ?metadata.name,
                "too many Events waiting to be created: this rejection is only logged"
            );
        }
    }
}

/// The `Warning` Event that reports a rejected object, named after the object and its
/// `resourceVersion` so that every agent that sees this version makes the same one.
fn rejection_event(
    resource: &ApiResource,
    metadata: &ObjectMeta,
    diagnostics: &[Diagnostic],
    instance: &str,
) -> Option<K8sEvent> {
    let namespace = metadata.namespace.clone()?;
    let name = metadata.name.as_deref()?;
    let version: String = metadata
        .resource_version
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let suffix = format!(".{}.{version}", resource.kind.to_ascii_lowercase());
    let mut prefix = name.to_owned();
    prefix.truncate(MAX_NAME.saturating_sub(suffix.len()));
    let prefix = prefix.trim_end_matches(['.', '-']);
    let problems: Vec<String> = diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| match d.field.as_str() {
            "" => d.reason.clone(),
            field => format!("{field}: {}", d.reason),
        })
        .collect();
    let note = truncate(
        format!(
            "rejected by the mesh (each agent keeps the last good version it saw in force, or \
             leaves the object out if it saw none; the rest applies): {}",
            problems.join("; ")
        ),
        MAX_NOTE,
    );
    Some(K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!("{prefix}{suffix}")),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some("Warning".to_owned()),
        reason: Some("Rejected".to_owned()),
        action: Some("Validate".to_owned()),
        note: Some(note),
        reporting_controller: Some(EVENT_CONTROLLER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some(resource.api_version.clone()),
            kind: Some(resource.kind.clone()),
            name: Some(name.to_owned()),
            namespace: Some(namespace),
            uid: metadata.uid.clone(),
            resource_version: metadata.resource_version.clone(),
            field_path: None,
        }),
        ..K8sEvent::default()
    })
}

/// `text`, cut to at most `max` bytes on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, convert::Infallible, sync::Mutex, time::Duration};

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
    use hyper::{body::Frame, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;

    use super::*;

    #[test]
    fn the_api_servers_and_kubectls_bookkeeping_is_not_kept() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "b-1",
                "annotations": {LAST_APPLIED: "{\"kind\":\"Pod\"}", "team": "payments"},
                "managedFields": [{
                    "manager": "kubelet",
                    "operation": "Update",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:podIP": {}}},
                }],
            },
            "spec": {"serviceAccountName": "b", "containers": [{"name": "b"}]},
        }))
        .unwrap();
        forget_bookkeeping(&mut pod);
        assert_eq!(pod.metadata.managed_fields, None);
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["team"]);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("b"));
    }

    /// What the fake API server serves besides `discovery.k8s.io` (at `v1`).
    #[derive(Clone, Copy)]
    struct Serve {
        /// `security.istio.io`: one RequestAuthentication, and a kind no ClusterRole grants.
        security: bool,
        /// `gateway.networking.k8s.io` at `v1` and `v1beta1`, as Gateway API 1.0 installs it:
        /// HTTPRoute (two, one of them invalid) and Gateway (none), but no GRPCRoute.
        gateway_api: bool,
    }

    /// Just enough of an API server: discovery, lists of the objects above, and watches that
    /// stay open without events. Records the paths asked for.
    async fn api_server(serve: Serve) -> (Client, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&asked);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let uri = request.uri().clone();
                    seen.lock().unwrap().push(uri.to_string());
                    let watching = uri.query().is_some_and(|q| q.contains("watch=true"));
                    let body = answer(serve, uri.path(), watching);
                    async move { Ok::<_, Infallible>(body) }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        let config = Config::new(url.parse().unwrap());
        (Client::try_from(config).unwrap(), asked)
    }

    type Body = BoxBody<Bytes, Infallible>;

    fn answer(serve: Serve, path: &str, watching: bool) -> Response<Body> {
        let json = |value: Value| {
            let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        };
        let version =
            |group: &str, v: &str| json!({"groupVersion": format!("{group}/{v}"), "version": v});
        let group = |name: &str, versions: &[&str]| {
            json!({"name": name, "versions": versions.iter().map(|v| version(name, v)).collect::<Vec<_>>(),
                   "preferredVersion": version(name, versions[0])})
        };
        let resource = |plural: &str, kind: &str| {
            json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                   "verbs": ["get", "list", "watch"]})
        };
        let list = |api_version: &str, kind: &str, items: Value| {
            json(
                json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                        "metadata": {"resourceVersion": "7"}, "items": items}),
            )
        };
        let gateway_api = format!("/apis/{GATEWAY_API_GROUP}/v1");
        match path {
            "/apis" => {
                let mut groups = vec![group(DISCOVERY_GROUP, &["v1"])];
                if serve.security {
                    groups.push(group("security.istio.io", &["v1", "v1beta1"]));
                }
                if serve.gateway_api {
                    groups.push(group(GATEWAY_API_GROUP, &["v1", "v1beta1"]));
                }
                json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
            }
            "/apis/security.istio.io/v1" | "/apis/security.istio.io/v1beta1" if serve.security => {
                json(json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": format!("security.istio.io/{}", path.rsplit('/').next().unwrap_or_default()),
                    "resources": [resource("requestauthentications", "RequestAuthentication"),
                                  // Not in the ClusterRole: never watched.
                                  resource("futurepolicies", "FuturePolicy")]}))
            }
            path if path == gateway_api && serve.gateway_api => {
                json(json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": format!("{GATEWAY_API_GROUP}/v1"),
                    "resources": [resource("httproutes", "HTTPRoute"),
                                  {"name": "httproutes/status", "singularName": "",
                                   "namespaced": true, "kind": "HTTPRoute",
                                   "verbs": ["get", "patch", "update"]},
                                  resource("gateways", "Gateway"),
                                  // Not read by the mesh: never watched.
                                  resource("referencegrants", "ReferenceGrant")]}))
            }
            path if watching
                && (path == "/apis/security.istio.io/v1/requestauthentications"
                    || path.starts_with(&format!("{gateway_api}/"))) =>
            {
                let pending = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
                let mut response = Response::new(BodyExt::boxed(StreamBody::new(pending)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
            "/apis/security.istio.io/v1/requestauthentications" => list(
                "security.istio.io/v1",
                "RequestAuthentication",
                json!([{"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                        "metadata": {"name": "jwt", "namespace": "shop", "resourceVersion": "7"},
                        "spec": {}}]),
            ),
            path if path == format!("{gateway_api}/httproutes") => list(
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
                // A GAMMA route (its parent a Service: `group: ""`), and one no reader takes.
                json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                        "metadata": {"name": "service-c", "namespace": "shop", "resourceVersion": "5"},
                        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "service-c",
                                                 "port": 8080}],
                                 "rules": [{"backendRefs": [
                                     {"name": "service-c-v1", "port": 8080, "weight": 90},
                                     {"name": "service-c-v2", "port": 8080, "weight": 10}]}]}},
                       {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                        "metadata": {"name": "bad", "namespace": "shop", "resourceVersion": "6"},
                        "spec": {"rules": "all of them"}}]),
            ),
            path if path == format!("{gateway_api}/gateways") => {
                list("gateway.networking.k8s.io/v1", "Gateway", json!([]))
            }
            _ => {
                let mut response = Response::new(Full::new(Bytes::from("{}")).boxed());
                *response.status_mut() = StatusCode::NOT_FOUND;
                response
            }
        }
    }

    #[tokio::test]
    async fn a_kind_not_implemented_that_the_server_serves_is_watched_and_reported() {
        let (client, asked) = api_server(Serve {
            security: true,
            gateway_api: false,
        })
        .await;
        let (sender, mut changes) = mpsc::channel(16);
        let watched =
            watch_not_implemented(&client, &sender, &ORIGIN.into(), &WatchMetrics::default()).await;
        assert_eq!(watched, ["RequestAuthentication"]);
        let change = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("the first list in time")
            .expect("a change");
        let SourceChange::Replace { kind, objects, .. } = change else {
            panic!("expected the list, got {change:?}");
        };
        assert_eq!(&*kind, "RequestAuthentication");
        assert_eq!(objects.len(), 1);
        let policy = &objects[0];
        assert_eq!(policy.key.to_string(), "RequestAuthentication shop/jwt");
        assert_eq!(&*policy.origin, "kubernetes");
        assert_eq!(
            policy.ignored().as_deref(),
            Some("kind RequestAuthentication is not implemented by this mesh: not enforced")
        );
        assert_eq!(policy.warnings.len(), 1);
        let asked = asked.lock().unwrap();
        assert!(
            !asked.iter().any(|path| path.contains("futurepolicies")),
            "{asked:?}"
        );
    }

    #[tokio::test]
    async fn without_the_crds_nothing_more_is_watched() {
        let (client, asked) = api_server(Serve {
            security: false,
            gateway_api: false,
        })
        .await;
        let (sender, _changes) = mpsc::channel(16);
        let watched =
            watch_not_implemented(&client, &sender, &ORIGIN.into(), &WatchMetrics::default()).await;
        assert!(watched.is_empty());
        assert_eq!(*asked.lock().unwrap(), ["/apis"]);
    }

    /// With the Gateway API's CRDs installed (as Gateway API 1.0 has them: no GRPCRoute), API
    /// discovery finds HTTPRoute and Gateway; their watches hold readiness until their first
    /// lists, and key every object, valid or rejected, as the store keys their kinds.
    #[tokio::test]
    async fn the_gateway_api_kinds_the_server_serves_are_watched_and_awaited() {
        let (client, asked) = api_server(Serve {
            security: false,
            gateway_api: true,
        })
        .await;
        let readiness = Arc::new(Readiness::starting());
        let served = tokio::time::timeout(Duration::from_secs(10), discover(&client, &readiness))
            .await
            .expect("API discovery in time");
        assert_eq!(served.endpoint_slices, EndpointSliceVersion::V1);
        let keyed: Vec<&str> = served.gateway_api.iter().map(|k| k.keyed_as).collect();
        assert_eq!(
            keyed,
            [
                "HTTPRoute.gateway.networking.k8s.io",
                "Gateway.gateway.networking.k8s.io"
            ]
        );

        let (sender, mut changes) = mpsc::channel(16);
        let (listed, mut lists) = watch::channel(0usize);
        let listed = Arc::new(listed);
        let metrics = WatchMetrics::default();
        let watch = |kind| Watch {
            kind,
            sender: sender.clone(),
            listed: Some(Arc::clone(&listed)),
            origin: ORIGIN.into(),
            failures: Failures::awaited(kind, &readiness, &metrics),
        };
        assert_eq!(
            watch_gateway_api(&client, &served.gateway_api, watch, None),
            2
        );
        let waiting = readiness.check().unwrap_err();
        assert!(
            waiting.contains("first list of HTTPRoute.gateway.networking.k8s.io (")
                && waiting.contains("first list of Gateway.gateway.networking.k8s.io ("),
            "{waiting}"
        );
        tokio::time::timeout(Duration::from_secs(10), lists.wait_for(|&n| n >= 2))
            .await
            .expect("the first lists in time")
            .unwrap();
        let mut replaced = BTreeMap::new();
        while let Ok(change) = changes.try_recv() {
            let SourceChange::Replace {
                kind,
                objects,
                rejected,
            } = change
            else {
                panic!("expected lists, got {change:?}");
            };
            let keys = |keys: Vec<Option<String>>| keys.into_iter().flatten().collect::<Vec<_>>();
            let objects = keys(objects.iter().map(|o| Some(o.key.to_string())).collect());
            let rejected = keys(
                rejected
                    .iter()
                    .map(|r| r.key.as_ref().map(ToString::to_string))
                    .collect(),
            );
            replaced.insert(kind.to_string(), (objects, rejected));
        }
        assert_eq!(
            replaced["HTTPRoute.gateway.networking.k8s.io"],
            (
                vec!["HTTPRoute.gateway.networking.k8s.io shop/service-c".to_owned()],
                vec!["HTTPRoute.gateway.networking.k8s.io shop/bad".to_owned()]
            )
        );
        assert_eq!(
            replaced["Gateway.gateway.networking.k8s.io"],
            (Vec::new(), Vec::new())
        );
        assert_eq!(replaced.len(), 2);
        // API discovery and both first lists are done: only what `run` itself holds is left.
        assert_eq!(readiness.check().unwrap_err(), "start-up (starting)");
        let asked = asked.lock().unwrap();
        assert!(
            !asked
                .iter()
                .any(|path| path.contains("grpcroutes") || path.contains("referencegrants")),
            "{asked:?}"
        );
    }

    #[tokio::test]
    async fn without_the_gateway_api_nothing_more_is_watched() {
        let (client, asked) = api_server(Serve {
            security: false,
            gateway_api: false,
        })
        .await;
        let readiness = Readiness::starting();
        let served = tokio::time::timeout(Duration::from_secs(10), discover(&client, &readiness))
            .await
            .expect("API discovery in time");
        assert!(served.gateway_api.is_empty(), "{served:?}");
        assert_eq!(*asked.lock().unwrap(), ["/apis"]);
        assert_eq!(readiness.check().unwrap_err(), "start-up (starting)");
    }

    /// Each watch is named after its kind as the store keys it: a relist replaces exactly the
    /// objects of its own kind, and a Gateway API `Gateway` is not Istio's.
    #[test]
    fn every_watched_kind_is_named_as_the_store_keys_it() {
        for kind in GATEWAY_API_KINDS {
            let resource = kind.resource();
            let key = ObjectKey::of(&resource.api_version, kind.kind, Some("shop"), "x");
            assert_eq!(&*key.kind, kind.keyed_as);
        }
        for (group, kind, _) in ISTIO_KINDS.into_iter().chain(NOT_IMPLEMENTED) {
            let key = ObjectKey::of(&format!("{group}/{ISTIO_VERSION}"), kind, None, "x");
            assert_eq!(&*key.kind, kind);
        }
        // Only kinds that can be listed and watched are chosen.
        let resources: APIResourceList = serde_json::from_value(json!({
            "groupVersion": "gateway.networking.k8s.io/v1",
            "resources": [
                {"name": "httproutes", "singularName": "", "namespaced": true,
                 "kind": "HTTPRoute", "verbs": ["get", "list"]},
                {"name": "grpcroutes", "singularName": "", "namespaced": true,
                 "kind": "GRPCRoute", "verbs": ["get", "list", "watch"]}
            ]
        }))
        .unwrap();
        let chosen: Vec<&str> = choose_gateway_api_kinds(&resources)
            .iter()
            .map(|k| k.kind)
            .collect();
        assert_eq!(chosen, ["GRPCRoute"]);
    }

    /// The VirtualService kind as the watches see it.
    fn virtual_service_resource() -> ApiResource {
        ApiResource {
            group: "networking.istio.io".into(),
            version: "v1beta1".into(),
            api_version: "networking.istio.io/v1beta1".into(),
            kind: "VirtualService".into(),
            plural: "virtualservices".into(),
        }
    }

    /// What a watch hands the store: an invalid object, on an event or in a (re)list, is a
    /// rejection with its identity — so the store keeps its last good version, where a relist
    /// once dropped it as gone — and so is an object of a typed kind that is not understood.
    #[tokio::test]
    async fn an_invalid_object_reaches_the_store_as_a_rejection_on_an_event_and_a_relist() {
        let resource = virtual_service_resource();
        let route = |name: &str, timeout: &str| -> DynamicObject {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"hosts": ["reviews"],
                         "http": [{"timeout": timeout,
                                   "route": [{"destination": {"host": "reviews"}}]}]}
            }))
            .unwrap()
        };
        let events: Events<DynamicObject> = Box::pin(futures_util::stream::iter([
            Ok(Event::Init),
            Ok(Event::InitApply(route("good", "1s"))),
            Ok(Event::InitApply(route("bad", "soon"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(route("good", "later"))),
            Ok(Event::Delete(route("bad", "soon"))),
        ]));
        let (sender, mut changes) = mpsc::channel(16);
        let watch = |kind| Watch {
            kind,
            sender: sender.clone(),
            listed: None,
            origin: ORIGIN.into(),
            failures: Failures::reported(kind, &WatchMetrics::default()),
        };
        watch("VirtualService")
            .run_sourced(events, move |object| read_dynamic(&resource, object, None))
            .await;
        let key = |name: &str| ObjectKey::new("VirtualService", Some("shop"), name);
        let Some(SourceChange::Replace {
            objects, rejected, ..
        }) = changes.recv().await
        else {
            panic!("a relist first");
        };
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].key, key("good"));
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].key, Some(key("bad")));
        assert!(rejected[0].diagnostics[0]
            .reason
            .contains("invalid duration \"soon\""));
        let Some(SourceChange::Reject(rejection)) = changes.recv().await else {
            panic!("an invalid update is a rejection, not a removal");
        };
        assert_eq!(rejection.key, Some(key("good")));
        let Some(SourceChange::Remove(removed)) = changes.recv().await else {
            panic!("a deletion removes");
        };
        assert_eq!(removed, key("bad"));

        // A typed kind: an object not understood is rejected with its identity.
        let slice: Events<EndpointSlice> = Box::pin(futures_util::stream::iter([Ok(
            Event::Apply(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some("reviews-x1".into()),
                    namespace: Some("shop".into()),
                    ..ObjectMeta::default()
                },
                ..EndpointSlice::default()
            }),
        )]));
        watch("EndpointSlice").run(slice, |_| None).await;
        let Some(SourceChange::Reject(rejection)) = changes.recv().await else {
            panic!("a rejection");
        };
        assert_eq!(
            rejection.key,
            Some(ObjectKey::new("EndpointSlice", Some("shop"), "reviews-x1"))
        );
        assert_eq!(
            rejection.diagnostics[0].to_string(),
            "kubernetes: EndpointSlice shop/reviews-x1: cannot be read as EndpointSlice"
        );
    }

    /// The Event of a rejected object: a `Warning` on the very version rejected, its problems
    /// in the note, named after the object and that version so every node's agent makes the
    /// same one (and a name too long for that is cut, not refused).
    #[test]
    fn a_rejected_object_is_reported_by_one_event_per_version() {
        let resource = virtual_service_resource();
        let object: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "service-c", "namespace": "shop", "uid": "u-1",
                         "resourceVersion": "4711"},
            "spec": {"hosts": ["service-c"],
                     "http": [{"timeout": "soon", "route": [{"destination": {"host": "x"}}]}]}
        }))
        .unwrap();
        let Some(Err(rejection)) = read_dynamic(&resource, object.clone(), None) else {
            panic!("the object is invalid");
        };
        assert_eq!(
            rejection.key.as_ref().map(ToString::to_string).as_deref(),
            Some("VirtualService shop/service-c")
        );
        let event = rejection_event(
            &resource,
            &object.metadata,
            &rejection.diagnostics,
            "node-1",
        )
        .expect("an event");
        assert_eq!(
            event.metadata.name.as_deref(),
            Some("service-c.virtualservice.4711")
        );
        assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("Rejected"));
        assert_eq!(
            event.reporting_controller.as_deref(),
            Some(EVENT_CONTROLLER)
        );
        assert_eq!(event.reporting_instance.as_deref(), Some("node-1"));
        let regarding = event.regarding.expect("the object");
        assert_eq!(
            (regarding.kind.as_deref(), regarding.uid.as_deref()),
            (Some("VirtualService"), Some("u-1"))
        );
        assert_eq!(regarding.resource_version.as_deref(), Some("4711"));
        let note = event.note.expect("a note");
        assert!(
            note.starts_with(
                "rejected by the mesh (each agent keeps the last good version it saw in force, \
                 or leaves the object out if it saw none; the rest applies): \
                 spec.http[0].timeout: invalid duration \"soon\""
            ),
            "{note}"
        );

        let mut long = object.metadata.clone();
        long.name = Some("a".repeat(253));
        let many = vec![rejection.diagnostics[0].clone(); 40];
        let event = rejection_event(&resource, &long, &many, "node-1").expect("an event");
        let name = event.metadata.name.expect("a name");
        assert_eq!(name.len(), 253);
        assert!(name.ends_with("a.virtualservice.4711"), "{name}");
        assert!(event.note.expect("a note").len() <= MAX_NOTE);
    }

    #[test]
    fn endpoint_slices_are_read_at_the_newest_version_served() {
        let served = |versions: &[&str]| {
            let versions: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
            choose_endpoint_slice_version(&versions)
        };
        assert_eq!(served(&["v1", "v1beta1"]), Ok(EndpointSliceVersion::V1));
        assert_eq!(served(&["v1beta1"]), Ok(EndpointSliceVersion::V1beta1));
        let error = served(&[]).unwrap_err();
        assert!(error.contains("serves no EndpointSlice"), "{error}");
    }

    #[test]
    fn a_v1beta1_endpoint_slice_reads_as_v1_with_its_topology_as_node_and_zone() {
        // As Kubernetes 1.20 serves it in a list: items without apiVersion and kind.
        let object: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "service-c-x1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "service-c"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.77.0.5"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "service-c-v1-0", "namespace": "shop"},
                 "topology": {"kubernetes.io/hostname": "node-1",
                              "topology.kubernetes.io/zone": "zone-a"}},
                {"addresses": ["10.77.0.6"], "conditions": {"ready": false}}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap();
        let slice = endpoint_slice_from_v1beta1(object).expect("read as v1");
        assert_eq!(slice.metadata.name.as_deref(), Some("service-c-x1"));
        assert_eq!(slice.address_type, "IPv4");
        let first = &slice.endpoints[0];
        assert_eq!(first.addresses, ["10.77.0.5"]);
        assert_eq!(first.conditions.as_ref().and_then(|c| c.ready), Some(true));
        assert_eq!(first.node_name.as_deref(), Some("node-1"));
        assert_eq!(first.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            first.target_ref.as_ref().and_then(|r| r.name.as_deref()),
            Some("service-c-v1-0")
        );
        assert_eq!(
            slice.endpoints[1].conditions.as_ref().and_then(|c| c.ready),
            Some(false)
        );
        let ports = slice.ports.as_deref().unwrap_or_default();
        assert_eq!(ports[0].port, Some(8080));
        // An empty slice (no endpoints at all) is still a slice.
        let empty: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "empty", "namespace": "shop"},
            "addressType": "IPv4", "endpoints": null
        }))
        .unwrap();
        assert!(endpoint_slice_from_v1beta1(empty)
            .expect("read")
            .endpoints
            .is_empty());
    }
}
