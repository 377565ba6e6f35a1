//! Kubernetes mode's workload certificates, end to end against a real 1.20 control plane: two
//! simulated nodes with their kubelets, an agent pod and a workload pod on each, the signer
//! (`mesh-agent ca serve`) running as a process with its ServiceAccount's RBAC from `deploy/`,
//! and each node's agent asking through the CSR API (the agent's issuer,
//! `mesh_agent::identity::csr`, in process, with its pod's projected pod-bound token, which the
//! kubelet stand-in requests as a kubelet does).
//!
//! Each agent obtains its own node's workload's certificate (SPIFFE SAN, issued by the CA, 24 h);
//! node-1's agent is refused the workload identity of node-2's pod and an identity no pod of its
//! node has; a token not bound to a pod is refused, and so is a deleted agent pod's; and every
//! CSR is gone once answered.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use mesh_agent::identity::{
    ca::TrustBundle,
    certificates::{CertificateSettings, SystemClock, WorkloadCertificate},
    csr::{kube_client, kubernetes_store, read_bundle, KubernetesIdentity},
    spiffe::SpiffeId,
    tls::spiffe_id_of,
};
use mesh_tests::control_plane::ControlPlane;
use mesh_tests::kubelet::Kubelet;
use mesh_tests::{require_root, SimNetwork, SimNode};
use serde_json::Value;

const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
const AGENT_NAMESPACE: &str = "sidecarless-system";
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent's issuer waits for one answer: the signer answers in well under a second.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

/// A workload on each node (service accounts web and db) and an agent pod on each node running
/// as the agents' ServiceAccount with the DaemonSet's projected pod-bound token (which the
/// kubelet stand-in writes). No legacy service-account token is mounted: 1.20's admission would
/// otherwise wait for the token controller's Secrets.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec:
  nodeName: node-1
  serviceAccountName: web
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - {name: web, image: mesh-test/upstream, args: [serve, --listen, '0.0.0.0:8080', --name, web]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: db
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - {name: db, image: mesh-test/upstream, args: [serve, --listen, '0.0.0.0:8080', --name, db]}
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-agent-node-1, namespace: sidecarless-system}
spec:
  nodeName: node-1
  serviceAccountName: mesh-agent
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: agent
    image: mesh-test/upstream
    args: [serve, --listen, '0.0.0.0:9090', --name, agent]
    volumeMounts: [{name: pod-token, mountPath: /var/run/secrets/sidecarless.io/serviceaccount}]
  volumes:
  - name: pod-token
    projected: {sources: [{serviceAccountToken: {path: token, expirationSeconds: 3600}}]}
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-agent-node-2, namespace: sidecarless-system}
spec:
  nodeName: node-2
  serviceAccountName: mesh-agent
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: agent
    image: mesh-test/upstream
    args: [serve, --listen, '0.0.0.0:9090', --name, agent]
    volumeMounts: [{name: pod-token, mountPath: /var/run/secrets/sidecarless.io/serviceaccount}]
  volumes:
  - name: pod-token
    projected: {sources: [{serviceAccountToken: {path: token, expirationSeconds: 3600}}]}
"#;

fn wait_for<T>(what: &str, check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    mesh_tests::wait_for(what, TIMEOUT, check)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
}

/// What one agent got for each identity it asked for: the certificate and how long the CSR
/// round trip took, or the error.
type Outcome = Result<(Arc<WorkloadCertificate>, Duration), String>;

/// Runs an agent's issuer on `node` (where the API server is reachable) with `kubeconfig` and,
/// if given, the pod-bound `token_file` as its credentials; asks for each identity in turn.
fn ask(
    node: &SimNode,
    kubeconfig: &Path,
    token_file: Option<&Path>,
    node_name: &str,
    identities: &[SpiffeId],
) -> Result<(String, Vec<Outcome>)> {
    node.run_on_node(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let client = kube_client(Some(kubeconfig), token_file).await?;
            let bundle = read_bundle(&client, AGENT_NAMESPACE).await?.to_pem();
            let settings = KubernetesIdentity {
                agent_namespace: AGENT_NAMESPACE.to_owned(),
                node_name: node_name.to_owned(),
                timeout: ISSUE_TIMEOUT,
            };
            let store = kubernetes_store(
                client,
                &settings,
                CertificateSettings::default(),
                Arc::new(SystemClock),
            )
            .await?;
            let mut outcomes = Vec::new();
            for identity in identities {
                let started = Instant::now();
                let outcome = store
                    .ready(identity)
                    .await
                    .map(|certificate| (certificate, started.elapsed()))
                    .map_err(|error| error.to_string());
                outcomes.push(outcome);
            }
            Ok((bundle, outcomes))
        })
    })?
}

/// The leaf names `identity`, is signed by the CA's root and valid 24 h (plus the 5 minutes of
/// clock skew allowed before its issue).
fn check_certificate(
    certificate: &WorkloadCertificate,
    identity: &SpiffeId,
    root_pem: &str,
) -> Result<()> {
    let leaf = certificate.certificate();
    ensure!(
        &spiffe_id_of(leaf)? == identity,
        "the certificate names {identity}"
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)?;
    let bundle = TrustBundle::from_pem(root_pem, SystemTime::now()).map_err(anyhow::Error::msg)?;
    let (_, root) = x509_parser::parse_x509_certificate(&bundle.roots()[0])?;
    ensure!(
        parsed.issuer() == root.subject(),
        "issued by {}, not the CA {}",
        parsed.issuer(),
        root.subject()
    );
    parsed
        .verify_signature(Some(root.public_key()))
        .context("the certificate's signature is the CA's")?;
    let validity = parsed.validity();
    let lifetime = (validity.not_after - validity.not_before).context("validity")?;
    ensure!(
        lifetime.whole_seconds() == 24 * 3600 + 5 * 60,
        "valid 24 h (+5 min of skew), not {lifetime}"
    );
    Ok(())
}

#[track_caller]
fn denied(outcome: &Outcome, reason: &str) -> Result<()> {
    match outcome {
        Ok((certificate, _)) => anyhow::bail!(
            "expected a denial ({reason}), got a certificate for {}",
            certificate.identity()
        ),
        Err(error) => ensure!(
            error.contains(&format!("denied: {reason}")),
            "expected a denial for {reason}: {error}"
        ),
    }
    Ok(())
}

#[test]
fn each_agent_obtains_only_its_own_nodes_workload_certificates() -> Result<()> {
    require_root();
    let network = SimNetwork::new(2)?;
    let nodes: Vec<Arc<SimNode>> = network.nodes().to_vec();
    let address = nodes[0]
        .underlay_ip()
        .context("node-1 has an underlay address")?;
    let control_plane = nodes[0].run_on_node(|| ControlPlane::start_on(address))??;
    let kubectl =
        |args: &[&str]| -> Result<String> { nodes[1].run_on_node(|| control_plane.kubectl(args))? };
    let kubelets: Vec<Kubelet> = nodes
        .iter()
        .zip(NODE_NAMES)
        .map(|(node, name)| Kubelet::start(node.clone(), &control_plane, name))
        .collect::<Result<_>>()?;

    let agent_kubeconfig = nodes[0].run_on_node(|| control_plane.agent_kubeconfig())??;
    let signer_kubeconfig = nodes[0].run_on_node(|| control_plane.signer_kubeconfig())??;
    let manifests = control_plane.dir().join("csr.yaml");
    std::fs::write(&manifests, MANIFESTS)?;
    kubectl(&["apply", "-f", &manifests.display().to_string()])?;
    wait_for("the agent and workload pods Running", || {
        let mut running = 0;
        for namespace in ["shop", AGENT_NAMESPACE] {
            let pods: Value =
                serde_json::from_str(&kubectl(&["-n", namespace, "get", "pods", "-o", "json"])?)?;
            running += pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|pod| pod["status"]["phase"] == "Running")
                .count();
        }
        Ok((running == 4).then_some(()))
    })?;

    // The CA, and the signer with it.
    let ca_dir = control_plane.dir().join("ca");
    mesh_tests::ca_init(&mesh_tests::agent_binary()?, &ca_dir)?;
    let root_pem = std::fs::read_to_string(ca_dir.join("root-cert.pem"))?;
    let mut serve = Command::new(mesh_tests::agent_binary()?);
    serve
        .args(["ca", "serve"])
        .arg(&ca_dir)
        .arg("--kubeconfig")
        .arg(&signer_kubeconfig)
        .env("RUST_LOG", "info");
    let mut signer = nodes[0].spawn_on_node(serve)?;
    wait_for("the signer's trust bundle ConfigMap", || {
        let bundle = kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "get",
            "configmap",
            "mesh-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ])
        .unwrap_or_default();
        Ok((!bundle.is_empty()).then_some(bundle))
    })
    .with_context(|| format!("signer: {}", signer.stderr().text()))?;

    // Each agent pod's projected token, as its kubelet wrote it.
    let tokens: Vec<PathBuf> = kubelets
        .iter()
        .zip(NODE_NAMES)
        .map(|(kubelet, name)| {
            let pod = kubelet
                .pod(AGENT_NAMESPACE, &format!("mesh-agent-{name}"))
                .with_context(|| format!("{name}'s kubelet runs its agent pod"))?;
            let dir = pod
                .volumes
                .get("pod-token")
                .context("the kubelet wrote the pod-token volume")?;
            Ok(dir.join("token"))
        })
        .collect::<Result<_>>()?;

    // node-1's agent: its own node's web, then node-2's db and an identity no pod has.
    let (bundle, node1) = ask(
        &nodes[0],
        &agent_kubeconfig,
        Some(&tokens[0]),
        NODE_NAMES[0],
        &[id("web"), id("db"), id("admin")],
    )
    .with_context(|| format!("signer: {}", signer.stderr().text()))?;
    ensure!(bundle == root_pem, "the bundle agents read is the CA's");
    let (web, web_round_trip) = node1[0]
        .as_ref()
        .map_err(|e| anyhow::anyhow!("node-1's web: {e}; signer: {}", signer.stderr().text()))?;
    check_certificate(web, &id("web"), &root_pem)?;
    denied(&node1[1], "WorkloadOnAnotherNode")?;
    denied(&node1[2], "NoSuchWorkload")?;

    // node-2's agent, from node-2: its db.
    let (_, node2) = ask(
        &nodes[1],
        &agent_kubeconfig,
        Some(&tokens[1]),
        NODE_NAMES[1],
        &[id("db"), id("web")],
    )?;
    let (db, db_round_trip) = node2[0]
        .as_ref()
        .map_err(|e| anyhow::anyhow!("node-2's db: {e}"))?;
    check_certificate(db, &id("db"), &root_pem)?;
    denied(&node2[1], "WorkloadOnAnotherNode")?;

    // The agents' ServiceAccount with a token bound to no pod: the API server records no pod,
    // so no node, and the signer refuses.
    let (_, unbound) = ask(
        &nodes[0],
        &agent_kubeconfig,
        None,
        NODE_NAMES[0],
        &[id("web")],
    )?;
    denied(&unbound[0], "NotPodBound")?;

    // A deleted agent pod's token: either the API server refuses it (a bound token dies with
    // its pod, once the server looks the pod up) or, as 1.20 was seen to do, accepts it and
    // records the gone pod, which the signer checks: no certificate either way.
    let stale = control_plane.dir().join("deleted-agent.token");
    std::fs::copy(&tokens[0], &stale)?;
    kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "delete",
        "pod",
        "mesh-agent-node-1",
        "--wait=true",
    ])?;
    let refused = ask(
        &nodes[0],
        &agent_kubeconfig,
        Some(&stale),
        NODE_NAMES[0],
        &[id("web")],
    );
    match refused {
        Ok((_, outcomes)) => denied(&outcomes[0], "RequesterPodGone")?,
        Err(error) => ensure!(
            format!("{error:#}").contains("Unauthorized"),
            "a deleted pod's token is refused as unauthorized: {error:#}"
        ),
    }

    // Every CSR was deleted once answered.
    let csrs: Value = serde_json::from_str(&kubectl(&["get", "csr", "-o", "json"])?)?;
    let left: Vec<&Value> = csrs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|csr| csr["spec"]["signerName"] == "sidecarless.io/workload")
        .collect();
    ensure!(left.is_empty(), "CSRs left behind: {left:?}");

    eprintln!(
        "CSR round trip (create → certificate): {} ms on node-1, {} ms on node-2",
        web_round_trip.as_millis(),
        db_round_trip.as_millis()
    );
    let log = signer.stderr().text();
    ensure!(
        log.contains("signed") && log.contains("denied"),
        "the signer logs its decisions: {log}"
    );
    signer.stop(Duration::from_secs(2))?;
    Ok(())
}
