//! Kubernetes mode: the tutorial as a platform team would run it. A real control plane
//! ([`ControlPlane`], Kubernetes 1.20) and the kubelet stand-in ([`Kubelet`]) run on the simulated
//! node; the demo apps are `deploy/demo/kubernetes/`'s Deployments, their images mapped to
//! `deploy/demo/run-app.sh` ([`demo_images`]); the agent runs in Kubernetes mode with its
//! ServiceAccount's token and serves the ingress gateway on the node's address, as the DaemonSet
//! does (`--ingress=$(HOST_IP):80`). Every change is `kubectl`: the seed's `oc create`, `oc
//! replace` and `oc scale`, one for one.
//!
//! What the harness does in place of a cluster's other parts, and why:
//! - it starts the agent itself (the stand-in runs no hostNetwork pod with host mounts), with
//!   the DaemonSet's flags that matter on one node: `--kubernetes`, `--node-name`, `--ingress`,
//!   `--mutual-tls` with the pod-bound token of a stand-in agent pod, and the mesh's signer
//!   (`crate::signer`): pods talk through tunnels, with certificates from CSRs;
//! - it writes the Services' cluster IPs into the pods' hosts files, as cluster DNS would answer
//!   (pods have no DNS server);
//! - it crashes and repairs a replica with a request straight to the pod from the node, where
//!   the seed uses `oc port-forward` (which needs a kubelet's streaming server).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{
    demo_dir, install_runtimes, prepare_apps, wait_until_routed, Action, Answer, PodInfo, World,
    DEPLOYMENTS,
};
use crate::{
    control_plane::ControlPlane,
    kubelet::{Images, Kubelet},
    mesh_config::examples_dir,
    signer::{self, Signer},
    Agent, SimNode,
};

/// The seed's namespace for the apps.
pub const NAMESPACE: &str = "servicemesh-apps";
/// The node's name in the cluster.
pub const NODE_NAME: &str = "node-1";
/// The port of the ingress gateway on the node (the DaemonSet's `MESH_INGRESS_PORT`).
pub const INGRESS_PORT: u16 = 80;
/// Label that enrolls a namespace's pods.
const MESH_LABEL: &str = "sidecarless.io/mesh=enabled";
/// How long the apps may take to become Ready: a JVM and Deno's first run take seconds each on
/// a busy 2-core machine, and they start together.
const READY_WITHIN: Duration = Duration::from_secs(180);
/// How long a change may take to reach the agent through its watches.
const ARRIVES_WITHIN: Duration = Duration::from_secs(60);

/// What the kubelet stand-in runs for the demo's images: `deploy/demo/run-app.sh <app>`, with the
/// container's environment (PORT, VERSION, SERVICE_*_HOST; HOSTNAME is the pod's name).
pub fn demo_images(deno: &Path) -> Images {
    let mut images = Images::default();
    for app in ["service-a", "service-b", "service-c"] {
        let deno = deno.to_owned();
        images = images.with(&format!("ghcr.io/example/mesh-demo-{app}"), move |_| {
            let mut command = Command::new(demo_dir().join("run-app.sh"));
            command.arg(app).env("DENO", &deno);
            Ok(command)
        });
    }
    images
}

pub struct KubernetesTutorial {
    // Field order is drop order: the agent, then the pods, then the control plane, then the
    // node they all run in.
    agent: Agent,
    signer: Signer,
    kubelet: Kubelet,
    control_plane: ControlPlane,
    node: Arc<SimNode>,
}

impl KubernetesTutorial {
    /// Installs the apps' runtimes and compiles Service C (cached), starts the node with a
    /// control plane and the kubelet stand-in, then does the seed's set-up with kubectl: the
    /// namespace, labelled for the mesh; the four Deployments and their Services; the agent;
    /// the gateway. Returns once the gateway answers through the whole chain.
    pub fn start(progress: &dyn Fn(&str)) -> Result<KubernetesTutorial> {
        crate::require_root();
        let deno = install_runtimes(progress)?;
        prepare_apps(progress)?;
        let node = Arc::new(SimNode::new()?);
        progress("starting a Kubernetes 1.20 control plane in the node (built once, cached) ...");
        let started = Instant::now();
        let control_plane = node.run_on_node(ControlPlane::start)??;
        progress(&format!(
            "control plane ready after {:.1} s; registering {NODE_NAME} with the kubelet stand-in",
            started.elapsed().as_secs_f64()
        ));
        let kubelet =
            Kubelet::start_with(node.clone(), &control_plane, NODE_NAME, demo_images(&deno))?;
        let kubectl = |args: &[&str]| node.run_on_node(|| control_plane.kubectl(args))?;

        kubectl(&["create", "namespace", NAMESPACE])?;
        kubectl(&["label", "namespace", NAMESPACE, MESH_LABEL])?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(demo_dir().join("kubernetes"))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        for file in &files {
            kubectl(&["-n", NAMESPACE, "create", "-f", path_arg(file)?])?;
        }
        progress("the demo's Deployments created; waiting for their pods to be Ready ...");
        let started = Instant::now();
        let kubeconfig = node.run_on_node(|| control_plane.agent_kubeconfig())??;
        let gateway = SocketAddr::from((node.ip(), INGRESS_PORT)).to_string();
        let agent_pod = control_plane.dir().join("agent-pod.yaml");
        std::fs::write(&agent_pod, signer::agent_pod(NODE_NAME))?;
        kubectl(&["apply", "-f", path_arg(&agent_pod)?])?;
        let signer = Signer::start(&node, &control_plane)?;
        let token = crate::wait_for("the agent pod's token", READY_WITHIN, || {
            Ok(signer::agent_token(&kubelet)
                .ok()
                .filter(|token| token.exists()))
        })?;
        let mut args = signer::agent_args(&kubeconfig, NODE_NAME, &token);
        args.extend(["--ingress".to_owned(), gateway]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::spawn(&node, &[], &args)?;
        let tutorial = KubernetesTutorial {
            agent,
            signer,
            kubelet,
            control_plane,
            node,
        };
        tutorial.wait_for_pods(DEPLOYMENTS.len(), READY_WITHIN)?;
        progress(&format!(
            "4 pods Ready after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        for service in ["service-a", "service-b", "service-c"] {
            let ip = tutorial.kubectl(&[
                "-n",
                NAMESPACE,
                "get",
                "service",
                service,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ])?;
            let ip: Ipv4Addr = ip
                .trim()
                .parse()
                .with_context(|| format!("{service}'s cluster IP {ip:?}"))?;
            tutorial.node.add_host(service, ip)?;
        }
        tutorial.agent.wait_ready(ARRIVES_WITHIN)?;
        tutorial.kubectl_apply("create", "gateway.yml")?;
        wait_until_routed(&tutorial, ARRIVES_WITHIN)?;
        crate::wait_for(
            "the chain answering through the gateway",
            ARRIVES_WITHIN,
            || {
                let (status, body) = tutorial.call()?;
                match super::answer(&body) {
                    Answer::Version(_) => Ok(Some(())),
                    Answer::Error => bail!("{status} {}", body.trim()),
                }
            },
        )?;
        Ok(tutorial)
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The mesh's signer, which issued the pods' certificates.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn kubelet(&self) -> &Kubelet {
        &self.kubelet
    }

    /// `kubectl ARGS` as the cluster's admin, from the node where the API server listens.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.node.run_on_node(|| self.control_plane.kubectl(args))?
    }

    /// `kubectl -n servicemesh-apps <verb> -f deploy/examples/<file>`, then waits until the agent
    /// holds every object at the version the API server answered.
    fn kubectl_apply(&self, verb: &str, file: &str) -> Result<String> {
        let path = examples_dir().join(file);
        let out = self.kubectl(&["-n", NAMESPACE, verb, "-f", path_arg(&path)?, "-o", "json"])?;
        let mut written = Vec::new();
        for value in serde_json::Deserializer::from_str(&out).into_iter::<Value>() {
            let value = value.with_context(|| format!("kubectl's answer: {out}"))?;
            match value["items"].as_array() {
                Some(items) => written.extend(items.iter().map(object_version)),
                None => written.push(object_version(&value)),
            }
        }
        crate::wait_for(
            &format!("the agent holding {file} as written ({written:?})"),
            ARRIVES_WITHIN,
            || {
                let (_, dump) = self.agent.admin_get("/config_dump")?;
                let dump: Value = serde_json::from_str(&dump).context("/config_dump")?;
                let held: BTreeSet<(String, String, String, String)> = dump["objects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(object_version)
                    .collect();
                Ok(written.iter().all(|w| held.contains(w)).then_some(()))
            },
        )?;
        Ok(out)
    }

    /// Waits until the tutorial's deployments have `count` pods, all running and Ready, none
    /// terminating.
    fn wait_for_pods(&self, count: usize, within: Duration) -> Result<()> {
        crate::wait_for(&format!("{count} pods Ready"), within, || {
            let all = self.pods_json()?;
            Ok((all.len() == count && self.running_pods()?.len() == count).then_some(()))
        })
    }

    fn pods_json(&self) -> Result<Vec<Value>> {
        let pods: Value =
            serde_json::from_str(&self.kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "json"])?)
                .context("kubectl get pods")?;
        Ok(pods["items"].as_array().cloned().unwrap_or_default())
    }
}

/// (kind, namespace, name, resourceVersion) of an object.
fn object_version(object: &Value) -> (String, String, String, String) {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let metadata = &object["metadata"];
    (
        text(&object["kind"]),
        text(&metadata["namespace"]),
        text(&metadata["name"]),
        text(&metadata["resourceVersion"]),
    )
}

fn path_arg(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

impl World for KubernetesTutorial {
    fn node(&self) -> &SimNode {
        &self.node
    }

    fn agent(&self) -> &Agent {
        &self.agent
    }

    fn gateway(&self) -> SocketAddr {
        SocketAddr::from((self.node.ip(), INGRESS_PORT))
    }

    /// The pods the API server shows Running and Ready, not terminating, by their labels'
    /// deployment (`app` and `version`).
    fn running_pods(&self) -> Result<Vec<PodInfo>> {
        let mut running = Vec::new();
        for pod in self.pods_json()? {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if !ready || !pod["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let labels = &pod["metadata"]["labels"];
            let Some((deployment, ..)) = DEPLOYMENTS
                .iter()
                .find(|(_, app, version)| labels["app"] == *app && labels["version"] == *version)
            else {
                continue;
            };
            running.push(PodInfo {
                deployment: (*deployment).to_owned(),
                name: pod["metadata"]["name"]
                    .as_str()
                    .context("a pod without a name")?
                    .to_owned(),
                ip: pod["status"]["podIP"]
                    .as_str()
                    .context("a Ready pod without an IP")?
                    .parse()?,
            });
        }
        running.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(running)
    }

    fn apply(&self, action: &Action) -> Result<String> {
        match action {
            Action::Create(file) => self.kubectl_apply("create", file),
            Action::Replace(file) => self.kubectl_apply("replace", file),
            _ => bail!("{action:?} is not a file to apply"),
        }
    }

    /// `kubectl scale`, then waits until the deployment has exactly `count` pods, Ready, and the
    /// agent routes to exactly the running pods.
    fn scale(&self, deployment: &str, count: usize) -> Result<()> {
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "scale",
            &format!("deployment/{deployment}"),
            "--replicas",
            &count.to_string(),
        ])?;
        let others = self
            .running_pods()?
            .iter()
            .filter(|pod| pod.deployment != deployment)
            .count();
        self.wait_for_pods(others + count, READY_WITHIN)?;
        wait_until_routed(self, ARRIVES_WITHIN)
    }

    fn command(&self, action: &Action) -> String {
        let pod = |deployment| {
            self.first_pod(deployment)
                .map_or_else(|_| format!("<a {deployment} pod>"), |pod| pod.name)
        };
        match action {
            Action::Create(file) => {
                format!("kubectl -n {NAMESPACE} create -f deploy/examples/{file}")
            }
            Action::Replace(file) => {
                format!("kubectl -n {NAMESPACE} replace -f deploy/examples/{file}")
            }
            Action::Scale(deployment, n) => {
                format!("kubectl -n {NAMESPACE} scale deploy/{deployment} --replicas {n}")
            }
            Action::Crash(deployment) => format!("cargo xtask demo crash {}", pod(deployment)),
            Action::Repair(deployment) => format!("cargo xtask demo repair {}", pod(deployment)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every image of `deploy/demo/kubernetes/` runs something in the kubelet stand-in.
    #[test]
    fn every_demo_image_is_in_the_kubelets_table() {
        let images = demo_images(Path::new("/usr/bin/deno"));
        let mut checked = 0;
        for entry in std::fs::read_dir(demo_dir().join("kubernetes")).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                if let Some(image) = line.trim().strip_prefix("image: ") {
                    assert!(images.launcher(image).is_some(), "{image} in {images:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4, "one image per Deployment");
    }

    /// The harness's agent serves the gateway where the DaemonSet's does.
    #[test]
    fn the_ingress_port_is_the_daemonsets() {
        let config = demo_dir().join("../base/configmap.yaml");
        let text = std::fs::read_to_string(&config).unwrap();
        let expected = format!("MESH_INGRESS_PORT: \"{INGRESS_PORT}\"");
        assert!(
            text.lines().any(|line| line.trim() == expected),
            "{expected} not in {}",
            config.display()
        );
    }
}
