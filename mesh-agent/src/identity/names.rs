//! Who is talking to whom: a service of the mesh and a workload (the pods of one Deployment),
//! named as Istio's telemetry labels name them. Discovery makes them from Kubernetes objects;
//! the engine, telemetry and the proxy only read them.

use std::collections::BTreeMap;

/// What a label is when its source does not say (Istio's word for it).
pub const UNKNOWN: &str = "unknown";

/// The cluster DNS suffix of service hosts (`name.namespace.svc.cluster.local`).
pub const CLUSTER_SUFFIX: &str = "svc.cluster.local";

/// A workload (the pods of one Deployment, say) as Istio's `*_workload*`, `*_app`,
/// `*_version` and `*_canonical_*` labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadIdentity {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    /// The service it belongs to whatever Services select it: what Kiali's graph draws as a
    /// node (`source_canonical_service`, `destination_canonical_service`).
    pub canonical_service: String,
    /// Its revision of that service (`*_canonical_revision`): Kiali's graph tells canary
    /// versions apart by it.
    pub canonical_revision: String,
}

impl WorkloadIdentity {
    /// Takes each name from the pod's labels as Istio does: `app` from `app`, then
    /// `app.kubernetes.io/name`; `version` from `version`, then `app.kubernetes.io/version`
    /// (`unknown` if absent); the canonical service from `service.istio.io/canonical-name`,
    /// `app.kubernetes.io/name`, `app`, else the workload's name; its revision from
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else
    /// `latest`.
    pub fn from_pod_labels(
        workload: impl Into<String>,
        namespace: impl Into<String>,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|key| labels.get(*key)).cloned();
        let workload = workload.into();
        WorkloadIdentity {
            namespace: namespace.into(),
            app: first(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| UNKNOWN.to_owned()),
            version: first(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| UNKNOWN.to_owned()),
            canonical_service: first(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload.clone()),
            canonical_revision: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".to_owned()),
            workload,
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
        assert_eq!(
            (
                id.canonical_service.as_str(),
                id.canonical_revision.as_str()
            ),
            ("reviews", "v2")
        );
        let bare = WorkloadIdentity::from_pod_labels("x", "default", &BTreeMap::new());
        assert_eq!(
            (bare.app.as_str(), bare.version.as_str()),
            ("unknown", "unknown")
        );
        assert_eq!(
            (
                bare.canonical_service.as_str(),
                bare.canonical_revision.as_str()
            ),
            ("x", "latest"),
            "Istio's fallbacks: the workload's name, `latest`"
        );
    }

    #[test]
    fn the_canonical_labels_win_over_app_and_version() {
        let labels = BTreeMap::from([
            ("app".to_owned(), "service-c".to_owned()),
            ("version".to_owned(), "v2".to_owned()),
            (
                "service.istio.io/canonical-name".to_owned(),
                "checkout".to_owned(),
            ),
            (
                "service.istio.io/canonical-revision".to_owned(),
                "canary".to_owned(),
            ),
        ]);
        let id = WorkloadIdentity::from_pod_labels("service-c-v2", "default", &labels);
        assert_eq!((id.app.as_str(), id.version.as_str()), ("service-c", "v2"));
        assert_eq!(
            (
                id.canonical_service.as_str(),
                id.canonical_revision.as_str()
            ),
            ("checkout", "canary")
        );
    }
}
