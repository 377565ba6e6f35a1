//! Kubernetes mode's enrollment: a pod on this node joins the mesh when it carries
//! `sidecarless.io/mesh: enabled`, or its namespace does and the pod does not say `disabled`.
//! Its network namespace is found without a CNI plugin: pod UID → the pod's cgroup in
//! `/proc/*/cgroup` (cgroupfs and systemd drivers) → `/proc/PID/ns/net`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::Store;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::warn;

use super::{Enrollments, PodSpec};
use crate::discovery::{
    kubernetes::{KubeSettings, Watches},
    membership::{in_mesh, pod_mesh_label, MESH_LABEL},
};

/// How often enrollment is checked even without a watch event: a pod's containers may start
/// after the event that made it Running.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// What enrollment reads of the cluster.
pub struct Cluster {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub changed: Arc<Notify>,
    pub node_name: String,
    pub proc_root: PathBuf,
}

impl Cluster {
    pub fn new(watches: &Watches, settings: &KubeSettings) -> Cluster {
        Cluster {
            pods: watches.pods.clone(),
            namespaces: watches.namespaces.clone(),
            changed: Arc::clone(&watches.enrollment_changed),
            node_name: settings.node_name.clone(),
            proc_root: settings.proc_root.clone(),
        }
    }
}

/// Enrolls this node's labelled pods now, then keeps enrollment in step with the cluster until
/// the task is dropped.
pub fn follow(cluster: Cluster, enrollments: Arc<Enrollments>) -> JoinHandle<()> {
    reconcile(&cluster, &enrollments);
    enrollments.prune_captures();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = cluster.changed.notified() => {}
                _ = tick.tick() => {}
            }
            reconcile(&cluster, &enrollments);
        }
    })
}

/// Enrolls this node's labelled, running pods and unenrolls the rest.
fn reconcile(cluster: &Cluster, enrollments: &Enrollments) {
    let namespaces: BTreeMap<String, Option<String>> = cluster
        .namespaces
        .state()
        .iter()
        .map(|ns| {
            let label = ns
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MESH_LABEL))
                .cloned();
            (ns.metadata.name.clone().unwrap_or_default(), label)
        })
        .collect();
    let enrolled: BTreeSet<String> = enrollments
        .list()
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let mut wanted = BTreeSet::new();
    for pod in cluster.pods.state() {
        if !should_enroll(&pod, &cluster.node_name, &namespaces) {
            continue;
        }
        let spec = PodSpec {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            netns: PathBuf::new(),
        };
        let key = spec.key();
        wanted.insert(key.clone());
        if enrolled.contains(&key) {
            continue;
        }
        let Some(uid) = pod.metadata.uid.as_deref() else {
            continue;
        };
        // Containers may not have started yet: the next reconcile tries again.
        let Some(netns) = pod_netns(&cluster.proc_root, uid) else {
            continue;
        };
        let spec = PodSpec { netns, ..spec };
        if let Err(error) = enrollments.enroll(&spec) {
            warn!(pod = %key, %error, "cannot enroll");
        }
    }
    for key in enrolled.difference(&wanted) {
        let _ = enrollments.unenroll(key);
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
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    in_mesh(
        pod_mesh_label(pod),
        namespaces.get(namespace).and_then(|l| l.as_deref()),
    )
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
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let uid = "8f7d2c1a-0b3e-4d5f-9a6b-1c2d3e4f5a6b";
        for (pid, cgroup) in [
            ("100", "0::/kubepods/besteffort/podffff/abc\n".to_owned()),
            ("200", format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope\n", uid.replace('-', "_"))),
            ("300", format!("0::/kubepods/burstable/pod{uid}/c1\n")),
        ] {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cgroup).unwrap();
        }
        let found = pod_netns(root, uid).unwrap();
        assert!(
            found == root.join("200/ns/net") || found == root.join("300/ns/net"),
            "{found:?}"
        );
        assert_eq!(
            pod_netns(root, "00000000-0000-0000-0000-000000000000"),
            None
        );
    }
}
