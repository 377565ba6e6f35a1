//! Kubernetes mode: the API server is the source. Reflectors watch `Service`, `EndpointSlice`,
//! `Pod`, `Namespace` and Istio's `VirtualService`/`DestinationRule`/`Gateway`; every change
//! feeds the same store local mode feeds, so engine and proxy do not know the difference.
//!
//! Enrollment by label: a pod on this node joins the mesh when it carries
//! `sidecarless.io/mesh: enabled`, or its namespace does and the pod does not say `disabled`.
//! Its network namespace is found without a CNI plugin: pod UID → the pod's cgroup in
//! `/proc/*/cgroup` (cgroupfs and systemd drivers) → `/proc/PID/ns/net`.
//!
//! Watches recover by themselves (backoff, relist on 410); until they do, the last good state
//! stays in force and traffic keeps flowing.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    serde::{de::DeserializeOwned, Serialize},
    Metadata, Resource,
};
use kube::{
    api::{ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Config,
};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    enrollment::{Enrollments, PodSpec},
    state::Store as ConfigStore,
};

/// The label that enrolls a pod or a namespace: `enabled`, or `disabled` on a pod to opt out.
pub const MESH_LABEL: &str = "sidecarless.io/mesh";

/// How often enrollment is checked even without a watch event: a pod's containers may start
/// after the event that made it Running.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);

pub struct KubeSettings {
    /// Kubeconfig file; none: in-cluster service account, or `$KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// This node: only its pods are enrolled.
    pub node_name: String,
    /// The host's `/proc` (mounted at `/host/proc` in the DaemonSet).
    pub proc_root: PathBuf,
}

const ISTIO_KINDS: [(&str, &str); 3] = [
    ("VirtualService", "virtualservices"),
    ("DestinationRule", "destinationrules"),
    ("Gateway", "gateways"),
];
const ISTIO_VERSION: &str = "v1beta1";

struct Watched {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    istio: Vec<(ApiResource, Store<DynamicObject>)>,
}

/// Starts the watches, waits for their first lists, puts the first state in force, then keeps
/// config and enrollment in step with the cluster until the task is dropped.
pub async fn start(
    settings: KubeSettings,
    store: Arc<ConfigStore>,
    enrollments: Arc<Enrollments>,
) -> Result<tokio::task::JoinHandle<()>> {
    let client = client(&settings).await?;
    let changed = Arc::new(Notify::new());
    let watched = Watched {
        services: reflect(Api::all(client.clone()), (), &changed),
        slices: reflect(Api::all(client.clone()), (), &changed),
        pods: reflect(Api::all(client.clone()), (), &changed),
        namespaces: reflect(Api::all(client.clone()), (), &changed),
        istio: ISTIO_KINDS
            .iter()
            .map(|(kind, plural)| {
                let resource = ApiResource {
                    group: "networking.istio.io".into(),
                    version: ISTIO_VERSION.into(),
                    api_version: format!("networking.istio.io/{ISTIO_VERSION}"),
                    kind: (*kind).into(),
                    plural: (*plural).into(),
                };
                let api = Api::all_with(client.clone(), &resource);
                let store = reflect(api, resource.clone(), &changed);
                (resource, store)
            })
            .collect(),
    };
    tokio::time::timeout(Duration::from_secs(30), watched.ready())
        .await
        .context("the API server did not answer the first lists within 30 s")?;
    sync(&watched, &store);
    reconcile(&watched, &settings, &enrollments);
    info!(node = %settings.node_name, "kubernetes state in force");
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = changed.notified() => {
                    // Coalesce a burst of events into one rebuild.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    sync(&watched, &store);
                }
                _ = tick.tick() => {}
            }
            reconcile(&watched, &settings, &enrollments);
        }
    }))
}

async fn client(settings: &KubeSettings) -> Result<Client> {
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

/// A reflector kept up to date by a watcher task that retries with backoff forever.
fn reflect<K>(api: Api<K>, dyntype: K::DynamicType, changed: &Arc<Notify>) -> Store<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let reader = writer.as_reader();
    let changed = Arc::clone(changed);
    tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff();
        futures_util::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => warn!(%error, "watch failed; retrying, the last good state stays"),
            }
        }
    });
    reader
}

impl Watched {
    async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        for (_, store) in &self.istio {
            let _ = store.wait_until_ready().await;
        }
    }

    fn objects(&self) -> Vec<Value> {
        let mut objects = typed(&self.services);
        objects.extend(typed(&self.slices));
        objects.extend(typed(&self.pods));
        for (resource, store) in &self.istio {
            objects.extend(store.state().iter().filter_map(|object| {
                let mut value = serde_json::to_value(&**object).ok()?;
                value["apiVersion"] = resource.api_version.clone().into();
                value["kind"] = resource.kind.clone().into();
                Some(without_server_fields(value))
            }));
        }
        objects
    }
}

fn typed<K>(store: &Store<K>) -> Vec<Value>
where
    K: Resource + Serialize + kube::Resource<DynamicType = ()> + Clone,
{
    store
        .state()
        .iter()
        .filter_map(|object| {
            let mut value = serde_json::to_value(&**object).ok()?;
            value["apiVersion"] = K::API_VERSION.into();
            value["kind"] = K::KIND.into();
            Some(without_server_fields(value))
        })
        .collect()
}

/// Fields the server manages carry nothing for us and would only be warned about.
fn without_server_fields(mut value: Value) -> Value {
    if let Some(metadata) = value["metadata"].as_object_mut() {
        for field in [
            "managedFields",
            "resourceVersion",
            "uid",
            "generation",
            "creationTimestamp",
            "annotations",
        ] {
            metadata.remove(field);
        }
    }
    value
}

fn sync(watched: &Watched, store: &ConfigStore) {
    // An invalid object is logged by the store and the last good state stays in force.
    let _ = store.set_watched("kubernetes", watched.objects());
}

/// Enrolls this node's labelled, running pods and unenrolls the rest.
fn reconcile(watched: &Watched, settings: &KubeSettings, enrollments: &Enrollments) {
    let namespaces: BTreeMap<String, Option<String>> = watched
        .namespaces
        .state()
        .iter()
        .map(|ns| {
            let label = ns
                .metadata()
                .labels
                .as_ref()
                .and_then(|l| l.get(MESH_LABEL))
                .cloned();
            (ns.metadata().name.clone().unwrap_or_default(), label)
        })
        .collect();
    let mut wanted = BTreeSet::new();
    for pod in watched.pods.state() {
        if !should_enroll(&pod, &settings.node_name, &namespaces) {
            continue;
        }
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = PodSpec {
            name: name.clone(),
            namespace: namespace.clone(),
            netns: PathBuf::new(),
        };
        wanted.insert(spec.key());
        if enrollments
            .list()
            .iter()
            .any(|p| p.name == name && p.namespace == namespace)
        {
            continue;
        }
        let Some(uid) = pod.metadata.uid.as_deref() else {
            continue;
        };
        // Containers may not have started yet: the next reconcile tries again.
        let Some(netns) = pod_netns(&settings.proc_root, uid) else {
            continue;
        };
        let spec = PodSpec { netns, ..spec };
        if let Err(error) = enrollments.enroll(&spec) {
            warn!(pod = %spec.key(), %error, "cannot enroll");
        }
    }
    for pod in enrollments.list() {
        let key = format!("{}/{}", pod.namespace, pod.name);
        if !wanted.contains(&key) {
            let _ = enrollments.unenroll(&key);
        }
    }
}

/// The pod's label wins over its namespace's; only running pods of this node, never
/// host-network pods (they share the node's namespace).
fn should_enroll(pod: &Pod, node: &str, namespaces: &BTreeMap<String, Option<String>>) -> bool {
    let spec = pod.spec.as_ref();
    let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if !on_node || host_network || !running || pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    match pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MESH_LABEL))
        .map(String::as_str)
    {
        Some("enabled") => true,
        Some(_) => false,
        None => {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            namespaces.get(namespace).and_then(|l| l.as_deref()) == Some("enabled")
        }
    }
}

/// `/proc/PID/ns/net` of a process in the pod's cgroup. The kubelet names that cgroup
/// `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd).
pub fn pod_netns(proc_root: &Path, uid: &str) -> Option<PathBuf> {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let entries = std::fs::read_dir(proc_root).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let in_pod = cgroups.lines().any(|line| {
            line.split('/')
                .any(|part| part == cgroupfs || part.ends_with(&systemd))
        });
        if in_pod {
            return Some(entry.path().join("ns/net"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)], namespace: &str, node: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p", "namespace": namespace,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            },
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace() {
        let namespaces = BTreeMap::from([
            ("meshed".to_owned(), Some("enabled".to_owned())),
            ("plain".to_owned(), None),
        ]);
        let cases = [
            (pod(&[], "meshed", "n1", "Running"), true),
            (
                pod(&[(MESH_LABEL, "disabled")], "meshed", "n1", "Running"),
                false,
            ),
            (
                pod(&[(MESH_LABEL, "enabled")], "plain", "n1", "Running"),
                true,
            ),
            (pod(&[], "plain", "n1", "Running"), false),
            (
                pod(&[(MESH_LABEL, "enabled")], "plain", "other-node", "Running"),
                false,
            ),
            (
                pod(&[(MESH_LABEL, "enabled")], "plain", "n1", "Pending"),
                false,
            ),
        ];
        for (i, (pod, want)) in cases.iter().enumerate() {
            assert_eq!(should_enroll(pod, "n1", &namespaces), *want, "case {i}");
        }
    }

    #[test]
    fn finds_a_pods_netns_by_cgroup_in_both_driver_layouts() {
        let root = std::env::temp_dir().join(format!("mesh-proc-{}", std::process::id()));
        let uid = "8f7d2c1a-0b3e-4d5f-9a6b-1c2d3e4f5a6b";
        for (pid, cgroup) in [
            ("100", "0::/kubepods/besteffort/podffff/abc\n".to_owned()),
            ("200", format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope\n", uid.replace('-', "_"))),
            ("300", format!("0::/kubepods/burstable/pod{uid}/c1\n")),
        ] {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cgroup).unwrap();
        }
        let found = pod_netns(&root, uid).unwrap();
        assert!(
            found == root.join("200/ns/net") || found == root.join("300/ns/net"),
            "{found:?}"
        );
        assert_eq!(
            pod_netns(&root, "00000000-0000-0000-0000-000000000000"),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
