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
//!
//! Then the whole path: `mesh-agent run --kubernetes --mutual-tls` on each node (the
//! DaemonSet's flags) enrolls its node's pods of the mesh, obtains their certificates from the
//! signer, and carries a request from web (node-1) to the db Service (node-2) through a tunnel:
//! the underlay carries it only inside TLS to port 15008, and the destination's agent reports
//! the caller's SPIFFE ID; an AuthorizationPolicy applied with kubectl is then enforced by db's
//! agent.

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
use mesh_tests::agent::sum_samples;
use mesh_tests::control_plane::ControlPlane;
use mesh_tests::kubelet::Kubelet;
use mesh_tests::signer::{self, Signer, AGENT_NAMESPACE};
use mesh_tests::{require_root, Agent, SimNetwork, SimNode};
use serde_json::Value;

const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent's issuer waits for one answer: the signer answers in well under a second.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

/// A namespace of the mesh with a workload on each node (service accounts web and db) and the
/// db Service. No legacy service-account token is mounted: 1.20's admission would otherwise wait
/// for the token controller's Secrets. ([`signer::agent_pod`] adds each node's agent pod.)
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {sidecarless.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
  ports: [{name: http, port: 8080, targetPort: 8080}]
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
metadata: {name: web-1, namespace: shop, labels: {app: web}}
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
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec:
  nodeName: node-2
  serviceAccountName: db
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - {name: db, image: mesh-test/upstream, args: [serve, --listen, '0.0.0.0:8080', --name, db]}
---
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

/// Two nodes, each with its kubelet, running [`MANIFESTS`] and an agent pod; the CA, and the
/// signer with it, its trust bundle published.
struct Cluster {
    // Dropped in this order: the signer, the pods' processes, the control plane, the nodes.
    signer: Signer,
    kubelets: Vec<Kubelet>,
    control_plane: ControlPlane,
    nodes: Vec<Arc<SimNode>>,
    network: SimNetwork,
    /// The agents' ServiceAccount's kubeconfig (deploy/base's RBAC).
    agent_kubeconfig: PathBuf,
    /// Each node's agent pod's projected pod-bound token, as its kubelet wrote it.
    tokens: Vec<PathBuf>,
}

impl Cluster {
    fn start() -> Result<Cluster> {
        require_root();
        let network = SimNetwork::new(2)?;
        let nodes: Vec<Arc<SimNode>> = network.nodes().to_vec();
        let address = nodes[0]
            .underlay_ip()
            .context("node-1 has an underlay address")?;
        let control_plane = nodes[0].run_on_node(|| ControlPlane::start_on(address))??;
        let kubelets: Vec<Kubelet> = nodes
            .iter()
            .zip(NODE_NAMES)
            .map(|(node, name)| Kubelet::start(node.clone(), &control_plane, name))
            .collect::<Result<_>>()?;
        let agent_kubeconfig = nodes[0].run_on_node(|| control_plane.agent_kubeconfig())??;
        let kubectl = |args: &[&str]| -> Result<String> {
            nodes[1].run_on_node(|| control_plane.kubectl(args))?
        };
        let manifests = control_plane.dir().join("csr.yaml");
        let agent_pods: String = NODE_NAMES
            .iter()
            .map(|name| signer::agent_pod(name))
            .collect();
        std::fs::write(&manifests, format!("{MANIFESTS}{agent_pods}"))?;
        kubectl(&["apply", "-f", &manifests.display().to_string()])?;
        wait_for("the agent and workload pods Running", || {
            let mut running = 0;
            for namespace in ["shop", AGENT_NAMESPACE] {
                let pods: Value = serde_json::from_str(&kubectl(&[
                    "-n", namespace, "get", "pods", "-o", "json",
                ])?)?;
                running += pods["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|pod| pod["status"]["phase"] == "Running")
                    .count();
            }
            Ok((running == 4).then_some(()))
        })?;
        let signer = Signer::start(&nodes[0], &control_plane)?;
        let tokens = kubelets
            .iter()
            .map(signer::agent_token)
            .collect::<Result<_>>()?;
        Ok(Cluster {
            signer,
            kubelets,
            control_plane,
            nodes,
            network,
            agent_kubeconfig,
            tokens,
        })
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.nodes[1].run_on_node(|| self.control_plane.kubectl(args))?
    }

    fn signer_log(&self) -> String {
        self.signer.log()
    }
}

#[test]
fn each_agent_obtains_only_its_own_nodes_workload_certificates() -> Result<()> {
    let mut cluster = Cluster::start()?;
    let nodes = cluster.nodes.clone();
    let agent_kubeconfig = cluster.agent_kubeconfig.clone();
    let tokens = cluster.tokens.clone();
    let root_pem = cluster.signer.root_pem().to_owned();
    let kubectl = |args: &[&str]| cluster.kubectl(args);

    // node-1's agent: its own node's web, then node-2's db and an identity no pod has.
    let (bundle, node1) = ask(
        &nodes[0],
        &agent_kubeconfig,
        Some(&tokens[0]),
        NODE_NAMES[0],
        &[id("web"), id("db"), id("admin")],
    )
    .with_context(|| format!("signer: {}", cluster.signer_log()))?;
    ensure!(bundle == root_pem, "the bundle agents read is the CA's");
    let (web, web_round_trip) = node1[0]
        .as_ref()
        .map_err(|e| anyhow::anyhow!("node-1's web: {e}; signer: {}", cluster.signer_log()))?;
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
    let stale = cluster.control_plane.dir().join("deleted-agent.token");
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
    let log = cluster.signer_log();
    ensure!(
        log.contains("signed") && log.contains("denied"),
        "the signer logs its decisions: {log}"
    );
    cluster.signer.stop(Duration::from_secs(2))?;
    Ok(())
}

#[test]
fn kubernetes_mode_agents_tunnel_between_nodes_with_certificates_from_the_signer() -> Result<()> {
    const REQUESTS: usize = 20;
    let cluster = Cluster::start()?;
    // The DaemonSet's flags, with the agent pod's token as its kubelet wrote it.
    let agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .zip(NODE_NAMES)
        .zip(&cluster.tokens)
        .map(|((node, name), token)| {
            let args = signer::agent_args(&cluster.agent_kubeconfig, name, token);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Agent::spawn(node, &[], &args)
        })
        .collect::<Result<_>>()?;
    for (agent, name) in agents.iter().zip(NODE_NAMES) {
        agent
            .wait_ready(TIMEOUT)
            .with_context(|| format!("{name}'s agent: {}", agent.stderr_text()))?;
    }
    for (agent, pod) in agents.iter().zip(["shop/web-1", "shop/db-1"]) {
        wait_for(&format!("{pod} enrolled"), || {
            Ok(agent.enrolled()?.iter().any(|p| p == pod).then_some(()))
        })?;
    }
    let service: Value = serde_json::from_str(
        &cluster.kubectl(&["-n", "shop", "get", "service", "db", "-o", "json"])?,
    )?;
    let cluster_ip: std::net::Ipv4Addr = service["spec"]["clusterIP"]
        .as_str()
        .context("db has a clusterIP")?
        .parse()?;
    cluster.network.add_host("db", cluster_ip)?;
    let web = cluster.kubelets[0]
        .pod("shop", "web-1")
        .context("node-1's kubelet runs web-1")?;

    let needle = format!("csr-tunnel-{}", std::process::id());
    let capture = mesh_tests::capture::Capture::start(&cluster.network)?;
    let url = format!("http://db:8080/{needle}");
    let mut get = Command::new(mesh_tests::upstream_binary()?);
    get.args(["get", "--url", &url, "--count", &REQUESTS.to_string()])
        .args(["--timeout-secs", "20", "--quiet"]);
    let mut get = cluster.nodes[0].spawn_in_pod(&web.pod, get)?;
    let finished = get.finish(TIMEOUT)?;
    let captured = capture.stop()?;
    ensure!(
        finished.success(),
        "GET {url} from web-1: {}\nnode-1's agent: {}",
        get.stderr().text(),
        agents[0].stderr_text()
    );
    let summary = get
        .stdout()
        .json_lines()
        .pop()
        .context("upstream get printed no summary")?;
    ensure!(
        summary["by_status"]["200"].as_u64() == Some(REQUESTS as u64),
        "every request answered 200: {summary}"
    );
    ensure!(
        captured.payload_bytes_to_port(15008) > 0,
        "the capture saw the tunnel"
    );
    ensure!(
        captured.payload_bytes_to_port(8080) == 0,
        "nothing crossed to the app's port in plaintext"
    );
    ensure!(
        !captured.contains(needle.as_bytes())?,
        "a request crossed the underlay in plaintext"
    );

    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let db_id = "spiffe://cluster.local/ns/shop/sa/db";
    let (_, source) = agents[0].admin_get("/metrics")?;
    let tunnelled = sum_samples(
        &source,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_principal", web_id),
            ("destination_principal", db_id),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
        ],
    );
    ensure!(tunnelled == REQUESTS as f64, "node-1's agent: {source}");
    let handshakes = sum_samples(
        &source,
        "mesh_tunnel_handshakes_total",
        &[("direction", "outbound")],
    );
    ensure!(handshakes == 1.0, "one pooled tunnel: {source}");
    let (_, destination) = agents[1].admin_get("/metrics")?;
    let received = sum_samples(
        &destination,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", web_id),
            ("destination_principal", db_id),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    ensure!(received >= 1.0, "node-2's agent: {destination}");
    // Both workload certificates came through CSRs, each signed for its own node.
    let log = cluster.signer_log();
    for (identity, node) in [(web_id, "node-1"), (db_id, "node-2")] {
        ensure!(
            log.lines().any(|line| line.contains("signed")
                && line.contains(identity)
                && line.contains(node)),
            "the signer signed {identity} for {node}: {log}"
        );
    }

    // An AuthorizationPolicy applied with kubectl reaches db's agent through its watch and is
    // enforced there: web may still GET, its POSTs are denied.
    let policy = tempfile::Builder::new()
        .prefix("mesh-policy-")
        .suffix(".yml")
        .tempfile()?;
    std::fs::write(
        policy.path(),
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
         metadata: {name: db-read-only, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules:\n  \
         - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]\n    \
         to: [{operation: {notMethods: [GET]}}]\n",
    )?;
    cluster.kubectl(&["apply", "-f", policy.path().to_str().context("temp path")?])?;
    let post = |method: &str| -> Result<Value> {
        let mut get = Command::new(mesh_tests::upstream_binary()?);
        get.args(["get", "--url", &url, "--count", "3", "--method", method])
            .args(["--timeout-secs", "20", "--quiet"]);
        let mut get = cluster.nodes[0].spawn_in_pod(&web.pod, get)?;
        get.finish(TIMEOUT)?;
        let summary = get.stdout().json_lines().pop();
        summary.context("upstream get printed no summary")
    };
    let last = std::cell::RefCell::new(Value::Null);
    let denied = wait_for("the policy enforced at db's agent", || {
        let summary = post("POST")?;
        *last.borrow_mut() = summary.clone();
        Ok((summary["by_status"]["403"] == 3).then_some(summary))
    })
    .with_context(|| {
        let (_, dump) = agents[1].admin_get("/config_dump").unwrap_or_default();
        format!(
            "last POSTs: {}\nnode-2's config: {dump}\nnode-2's agent: {}",
            last.borrow(),
            agents[1].stderr_text()
        )
    })?;
    let allowed = post("GET")?;
    ensure!(
        allowed["by_status"]["200"] == 3,
        "GET still allowed: {allowed}; POST: {denied}"
    );
    let (_, destination) = agents[1].admin_get("/metrics")?;
    ensure!(
        sum_samples(
            &destination,
            "mesh_authorization_denials_total",
            &[("layer", "request")]
        ) >= 3.0,
        "node-2's agent counted the denials: {destination}"
    );
    Ok(())
}
