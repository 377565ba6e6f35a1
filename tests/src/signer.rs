//! Kubernetes mode's workload certificates as the tests set them up: the mesh's CA, its signer
//! (`mesh-agent ca serve`, run as a process with its ServiceAccount's RBAC from `deploy/`), and an
//! agent pod per node. The kubelet stand-in runs no hostNetwork pod with host mounts, so the
//! agent itself runs on the node; its pod is a stand-in that runs as the agents' ServiceAccount
//! with the DaemonSet's projected pod-bound token, which the kubelet writes, and the agent on the
//! node makes its CSRs with that token (`--mutual-tls --token-file`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{control_plane::ControlPlane, kubelet::Kubelet, PodProcess, SimNode};

/// The agents' namespace (deploy/base), where the signer publishes the trust bundle.
pub const AGENT_NAMESPACE: &str = "sidecarless-system";

/// The DaemonSet's pod-bound token volume.
const TOKEN_VOLUME: &str = "pod-token";

/// How long the signer may take to publish the bundle.
const PUBLISHED_WITHIN: Duration = Duration::from_secs(60);

/// The manifest of `node_name`'s agent pod: the agents' ServiceAccount and the DaemonSet's
/// projected token, no legacy token (1.20's admission would wait for the token controller's
/// Secrets). Its container serves nothing of the mesh.
pub fn agent_pod(node_name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: mesh-agent-{node_name}, namespace: {AGENT_NAMESPACE}}}
spec:
  nodeName: {node_name}
  serviceAccountName: mesh-agent
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: agent
    image: mesh-test/upstream
    args: [serve, --listen, '0.0.0.0:9090', --name, agent]
    volumeMounts: [{{name: {TOKEN_VOLUME}, mountPath: /var/run/secrets/sidecarless.io/serviceaccount}}]
  volumes:
  - name: {TOKEN_VOLUME}
    projected: {{sources: [{{serviceAccountToken: {{path: token, expirationSeconds: 3600}}}}]}}
---
"#
    )
}

/// The pod-bound token of `kubelet`'s node's agent pod ([`agent_pod`]), as the kubelet wrote it.
pub fn agent_token(kubelet: &Kubelet) -> Result<PathBuf> {
    let name = kubelet.node_name();
    let pod = kubelet
        .pod(AGENT_NAMESPACE, &format!("mesh-agent-{name}"))
        .with_context(|| format!("{name}'s kubelet runs its agent pod"))?;
    let dir = pod
        .volumes
        .get(TOKEN_VOLUME)
        .context("the kubelet wrote the pod-token volume")?;
    Ok(dir.join("token"))
}

/// The signer, running with a CA of its own made in the control plane's folder.
pub struct Signer {
    process: PodProcess,
    root_pem: String,
}

impl Signer {
    /// Makes the CA, starts the signer on `node` and waits until it has published the trust
    /// bundle.
    pub fn start(node: &SimNode, control_plane: &ControlPlane) -> Result<Signer> {
        let agent = crate::agent_binary()?;
        let ca = control_plane.dir().join("ca");
        crate::ca_init(&agent, &ca)?;
        let root_pem = std::fs::read_to_string(ca.join("root-cert.pem"))?;
        let kubeconfig = node.run_on_node(|| control_plane.signer_kubeconfig())??;
        let mut serve = Command::new(agent);
        serve
            .args(["ca", "serve"])
            .arg(&ca)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("RUST_LOG", "info");
        let process = node.spawn_on_node(serve)?;
        let signer = Signer { process, root_pem };
        crate::wait_for(
            "the signer's trust bundle ConfigMap",
            PUBLISHED_WITHIN,
            || {
                let bundle = node
                    .run_on_node(|| {
                        control_plane.kubectl(&[
                            "-n",
                            AGENT_NAMESPACE,
                            "get",
                            "configmap",
                            "mesh-ca-root-cert",
                            "-o",
                            "jsonpath={.data.root-cert\\.pem}",
                        ])
                    })?
                    .unwrap_or_default();
                Ok((!bundle.is_empty()).then_some(()))
            },
        )
        .with_context(|| format!("signer: {}", signer.log()))?;
        Ok(signer)
    }

    /// The CA's root, PEM: what the bundle must hold.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Everything the signer logged so far (a line per decision).
    pub fn log(&self) -> String {
        self.process.stderr().text()
    }

    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        self.process.stop(grace)?;
        Ok(())
    }
}

/// `mesh-agent run` arguments for Kubernetes mode with mutual TLS, with `token` as the agent
/// pod's pod-bound token.
pub fn agent_args(kubeconfig: &Path, node_name: &str, token: &Path) -> Vec<String> {
    vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        node_name.into(),
        "--mutual-tls".into(),
        "--token-file".into(),
        token.display().to_string(),
    ]
}
