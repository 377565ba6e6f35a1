//! Who is talking to whom: a service of the mesh and a workload (the pods of one Deployment),
//! named as Istio's telemetry labels name them. Discovery makes them from Kubernetes objects;
//! the engine, telemetry and the proxy only read them.

use std::collections::BTreeMap;

/// What a label is when its source does not say (Istio's word for it).
pub const UNKNOWN: &str = "unknown";

/// The cluster DNS suffix of service hosts (`name.namespace.svc.cluster.local`).
pub const CLUSTER_SUFFIX: &str = "svc.cluster.local";

/// A workload (the pods of one Deployment, say) as Istio's `*_workload*`, `*_app` and
/// `*_version` labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadIdentity {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
}

impl WorkloadIdentity {
    /// Takes `app` and `version` from the pod's labels as Istio does (`app`, then
    /// `app.kubernetes.io/name`; `version`, then `app.kubernetes.io/version`), `unknown` if absent.
    pub fn from_pod_labels(
        workload: impl Into<String>,
        namespace: impl Into<String>,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let first = |keys: [&str; 2]| {
            keys.iter()
                .find_map(|key| labels.get(*key))
                .cloned()
                .unwrap_or_else(|| UNKNOWN.to_owned())
        };
        WorkloadIdentity {
            workload: workload.into(),
            namespace: namespace.into(),
            app: first(["app", "app.kubernetes.io/name"]),
            version: first(["version", "app.kubernetes.io/version"]),
        }
    }
}

/// A service of the mesh's registry, for the `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceIdentity {
    /// The fully qualified host, `name.namespace.svc.cluster.local` (Istio's
    /// `destination_service`).
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceIdentity {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        let (name, namespace) = (name.into(), namespace.into());
        ServiceIdentity {
            host: format!("{name}.{namespace}.{CLUSTER_SUFFIX}"),
            name,
            namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_identity_reads_istio_labels() {
        let labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "reviews".to_owned()),
            ("version".to_owned(), "v2".to_owned()),
        ]);
        let id = WorkloadIdentity::from_pod_labels("reviews-v2", "bookinfo", &labels);
        assert_eq!((id.app.as_str(), id.version.as_str()), ("reviews", "v2"));
        let bare = WorkloadIdentity::from_pod_labels("x", "default", &BTreeMap::new());
        assert_eq!(
            (bare.app.as_str(), bare.version.as_str()),
            ("unknown", "unknown")
        );
    }
}
