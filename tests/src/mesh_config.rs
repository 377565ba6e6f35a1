//! Local-mode config folders for end-to-end tests: Kubernetes-shaped `Service`,
//! `EndpointSlice` and `Pod` objects for pods of a simulated node, plus any mesh rules.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::Pod;

/// A config folder under the system temp dir, removed on drop.
pub struct ConfigDir {
    dir: tempfile::TempDir,
}

/// The label that puts a pod in the mesh: with agents given `--ca`, connections to it go
/// through mutual TLS tunnels. Add it to a [`Backend`]'s labels.
pub const IN_MESH: (&str, &str) = ("sidecarless.io/mesh", "enabled");

/// A pod behind a service, with the labels subsets select on. It runs as the service account
/// named after its service (each service its own identity, as Istio's samples set it up), and
/// is in the mesh when its labels hold [`IN_MESH`].
pub struct Backend<'a> {
    pub pod: &'a Pod,
    pub labels: &'a [(&'a str, &'a str)],
}

impl ConfigDir {
    pub fn new() -> Result<ConfigDir> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-config-")
            .tempdir()
            .context("creating a config folder")?;
        Ok(ConfigDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        let file = self.path().join(name);
        // Write then rename, so the agent's watcher never reads half a file.
        let tmp = self.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &file)?;
        Ok(())
    }

    /// Copies a file from `deploy/examples/`.
    pub fn copy_example(&self, example: &str, name: &str) -> Result<()> {
        let text = std::fs::read_to_string(examples_dir().join(example))
            .with_context(|| format!("reading example {example}"))?;
        self.write(name, &text)
    }

    /// Writes `service-<name>.yml`: a `Service` at `vip:port` (port name `http`, or `tcp` when
    /// `protocol` says so), its `EndpointSlice`, and one `Pod` per backend, running as service
    /// account `name`.
    pub fn service(
        &self,
        name: &str,
        vip: Ipv4Addr,
        port: u16,
        port_name: &str,
        backends: &[Backend<'_>],
    ) -> Result<()> {
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  clusterIP: {vip}\n  selector: {{app: {name}}}\n  ports:\n  - {{name: {port_name}, port: {port}, targetPort: {port}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\nendpoints:\n"
        );
        for backend in backends {
            let _ = writeln!(
                text,
                "- addresses: [{}]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}",
                backend.pod.ip(),
                backend.pod.name()
            );
        }
        for backend in backends {
            let labels: Vec<String> = backend
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n  labels: {{{}}}\n\
                 spec: {{serviceAccountName: {name}}}\nstatus: {{podIP: {}}}\n",
                backend.pod.name(),
                labels.join(", "),
                backend.pod.ip()
            );
        }
        self.write(&format!("service-{name}.yml"), &text)
    }
}

/// `deploy/examples/` of this repository.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}
