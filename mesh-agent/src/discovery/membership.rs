//! Who is in the mesh: the `sidecarless.io/mesh` label of a pod or its namespace. Enrollment
//! (which pods of this node the agent serves) and discovery (whether a source agent tunnels to
//! a pod, on any node) decide with the same rule.

use k8s_openapi::api::core::v1::Pod;

/// The label that enrolls a pod or a namespace: `enabled`, or `disabled` on a pod to opt out.
pub const MESH_LABEL: &str = "sidecarless.io/mesh";

/// The pod's `sidecarless.io/mesh` label, if it has one.
pub fn pod_mesh_label(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MESH_LABEL))
        .map(String::as_str)
}

/// Whether a pod with mesh label `pod` in a namespace with mesh label `namespace` is in the
/// mesh: the pod's label wins (`enabled` or anything else, which opts out); without one, the
/// namespace's `enabled` brings it in. Enrollment and discovery (which tells a source agent
/// whether to tunnel to a pod) both decide with this.
pub fn in_mesh(pod: Option<&str>, namespace: Option<&str>) -> bool {
    match pod {
        Some(label) => label == "enabled",
        None => namespace == Some("enabled"),
    }
}
