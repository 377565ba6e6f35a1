//! Zero-downtime restarts (issue 17): a new agent — the same binary, or another one (an
//! upgrade) — takes over from the running one through its handover socket, under load, and not
//! one request fails or bypasses the mesh. What each failure mode costs instead (no successor,
//! a successor that fails, SIGKILL) is tested here too; docs/reliability.md sums it up.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{attached_program_ids, attached_programs},
    require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode,
};
use serde_json::{json, Value};

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const URL: &str = "http://backend:8080/";
/// The ingress gateway's address in the node's namespace.
const INGRESS: &str = "127.0.0.1:18081";
/// The connect4, connect6 and sockops programs.
const PROGRAMS: u32 = 3;
/// How long a successor may take to start and take over (a debug build loads its programs in
/// about a second).
const TAKE_OVER: Duration = Duration::from_secs(30);
/// The agents' drain: long enough for the long requests, never reached otherwise.
const DRAIN_SECONDS: &str = "30";

fn upstream(args: &[&str]) -> Command {
    let mut command = Command::new(UPSTREAM);
    command.args(args);
    command
}

/// A node with an enrolled client, a `backend` service (one pod running `upstream serve
/// --log`), and its config folder.
struct Mesh {
    node: SimNode,
    client: Pod,
    server: PodProcess,
    config: ConfigDir,
    backend: Pod,
}

fn mesh() -> Mesh {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let backend = node.add_pod("backend-0").unwrap();
    node.add_host("backend", SERVICE).unwrap();
    let args = [
        "serve",
        "--listen",
        "0.0.0.0:8080",
        "--name",
        "backend",
        "--log",
    ];
    let server = node.spawn_in_pod(&backend, upstream(&args)).unwrap();
    server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), TAKE_OVER)
        .unwrap();
    let config = ConfigDir::new().unwrap();
    config
        .service(
            "backend",
            SERVICE,
            8080,
            "http",
            &[Backend {
                pod: &backend,
                labels: &[("app", "backend")],
            }],
        )
        .unwrap();
    Mesh {
        node,
        client,
        server,
        config,
        backend,
    }
}

impl Mesh {
    fn agent(&self) -> Agent {
        self.agent_with(&[])
    }

    fn agent_with(&self, extra: &[&str]) -> Agent {
        let config = self.config.path().to_str().unwrap();
        let mut args = vec!["--config", config, "--drain-seconds", DRAIN_SECONDS];
        args.extend(extra);
        Agent::start(&self.node, &[&self.client], &args).unwrap()
    }

    /// `upstream get` of the service in the client pod with `args`, running in the background.
    fn load(&self, args: &[&str]) -> PodProcess {
        self.load_to(URL, args)
    }

    /// `upstream get` of `url` in the client pod with `args`, running in the background.
    fn load_to(&self, url: &str, args: &[&str]) -> PodProcess {
        let mut all = vec!["get", "--url", url, "--timeout-secs", "20"];
        all.extend(args);
        self.node
            .spawn_in_pod(&self.client, upstream(&all))
            .unwrap()
    }

    /// What the backend received: request id → whether it came with the mesh's `traceparent`.
    fn received(&self) -> BTreeMap<String, bool> {
        self.server
            .stdout()
            .json_lines()
            .iter()
            .filter_map(|line| {
                let id = line["request_id"].as_str()?;
                Some((id.to_owned(), line["traceparent"].is_string()))
            })
            .collect()
    }
}

/// The summary line of a finished `upstream get`.
fn summary(process: &mut PodProcess, timeout: Duration) -> Value {
    let status = process.finish(timeout).unwrap();
    assert!(status.success(), "{}", process.stderr().text());
    process
        .stdout()
        .json_lines()
        .into_iter()
        .rfind(|line| line["summary"] == true)
        .expect("the client printed no summary")
}

/// A copy of the agent binary under another name: the "new version" a rollout starts.
fn second_binary(dir: &Path) -> PathBuf {
    let copy = dir.join("mesh-agent-next");
    std::fs::copy(mesh_tests::agent_binary().unwrap(), &copy).unwrap();
    copy
}

/// A duration the successor logged with its take-over, in ms: `overlap_ms` (both agents up,
/// from hello to released) or `switch_ms` (from "take over" to released).
fn took_over_ms(agent: &Agent, field: &str) -> u64 {
    let text = agent.stderr_text();
    let line = text
        .lines()
        .find(|line| line.contains("took over from the running agent"))
        .expect("the successor logged its take-over");
    let digits: String = line
        .split(&format!("{field}="))
        .nth(1)
        .unwrap_or_else(|| panic!("no {field} in {line:?}"))
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// 20 restarts, every other one to a second binary, under ~500 requests a second — half on
/// keep-alive connections, half on a new connection each — with long requests in flight
/// across some of them: every request answered 200, every one reached the backend through the
/// agent (it carries the mesh's `traceparent`), and the kernel never found an enrolled pod
/// without its agent (`agent_absent` stays 0).
#[test]
fn restarts_and_upgrades_under_load_lose_no_request_and_bypass_none() {
    const RESTARTS: usize = 20;
    let mesh = mesh();
    let dir = tempfile::tempdir().unwrap();
    let binaries = [
        mesh_tests::agent_binary().unwrap(),
        second_binary(dir.path()),
    ];
    // An ingress listener too: each successor must take it over (it could not bind it).
    let mut agent = mesh.agent_with(&["--ingress", INGRESS]);
    // 250 a second each, until SIGINT (the count only caps a run that goes wrong); a loop
    // making a new connection per request is slower, so that load has more of them.
    let load = |prefix: &str, concurrency: &str, extra: &[&str]| {
        let mut args = vec![
            "--rate",
            "250",
            "--concurrency",
            concurrency,
            "--count",
            "100000",
            "--request-ids",
            prefix,
            "--quiet",
            "--until-sigint",
        ];
        args.extend(extra);
        mesh.load(&args)
    };
    let loaded = Instant::now();
    let keep_alive = load("ka", "10", &[]);
    let per_request = load("nc", "25", &["--close"]);
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let mut superseded = Vec::new();
    let mut long_requests = Vec::new();
    let mut overlaps = Vec::new();
    let mut switches = Vec::new();
    for restart in 0..RESTARTS {
        if restart % 5 == 2 {
            // Held 3 s by the backend: in flight across this restart and the next.
            let prefix = format!("long-{restart}");
            let path = format!("{URL}delay/3000");
            let args = ["get", "--url", &path, "--request-ids", &prefix];
            let process = mesh
                .node
                .spawn_in_pod(&mesh.client, upstream(&args))
                .unwrap();
            // The client's one loop, its first request.
            long_requests.push((restart, format!("{prefix}-0-0"), process));
            std::thread::sleep(Duration::from_millis(200));
        }
        let binary = &binaries[restart % 2];
        let programs = attached_program_ids(mesh.node.cgroup_path()).unwrap();
        let successor = agent
            .successor(&mesh.node, binary, TAKE_OVER)
            .unwrap_or_else(|error| panic!("restart {restart}: {error:#}"));
        overlaps.push(took_over_ms(&successor, "overlap_ms"));
        switches.push(took_over_ms(&successor, "switch_ms"));
        let mut old = std::mem::replace(&mut agent, successor);
        // As a DaemonSet rollout does once the new pod is ready.
        old.process().signal(libc::SIGTERM).unwrap();
        superseded.push(old);
        let now = attached_program_ids(mesh.node.cgroup_path()).unwrap();
        assert_eq!(
            now.len() as u32,
            PROGRAMS,
            "restart {restart}: one per hook, never two"
        );
        assert!(
            now.iter().all(|id| !programs.contains(id)),
            "restart {restart}: the successor's programs run, not its predecessor's: {programs:?} \
             then {now:?}"
        );
    }
    let restarting = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let load_time = loaded.elapsed();

    let mut sent = 0;
    for (name, mut load) in [("keep-alive", keep_alive), ("per-request", per_request)] {
        load.signal(libc::SIGINT).unwrap();
        let summary = summary(&mut load, Duration::from_secs(30));
        let count = summary["sent"].as_u64().unwrap();
        assert_eq!(summary["errors"], 0, "{name}: {summary}");
        assert_eq!(
            summary["by_status"],
            json!({ "200": count }),
            "{name}: {summary}"
        );
        sent += count;
    }
    for (restart, id, mut long) in long_requests {
        let summary = summary(&mut long, Duration::from_secs(30));
        assert_eq!(summary["by_status"], json!({ "200": 1 }), "{id}: {summary}");
        // Served to the end by the agent that was superseded meanwhile.
        let served = superseded[restart].wait_for_records(
            1,
            |record| record["request_id"] == id.as_str(),
            Duration::from_secs(10),
        );
        let by: Vec<usize> = superseded
            .iter()
            .enumerate()
            .filter(|(_, old)| {
                old.access_log()
                    .iter()
                    .any(|r| r["request_id"] == id.as_str())
            })
            .map(|(i, _)| i)
            .collect();
        let records = served.unwrap_or_else(|error| {
            panic!("{id}, sent before restart {restart}, was served by agents {by:?}: {error:#}")
        });
        assert_eq!(records[0]["status"], 200, "{}", records[0]);
    }
    let rate = sent as f64 / load_time.as_secs_f64();
    assert!(
        rate > 250.0,
        "the load ran at {rate:.0} requests a second, not ~500"
    );
    let received = mesh.received();
    let load_ids: Vec<(&String, &bool)> = received
        .iter()
        .filter(|(id, _)| id.starts_with("ka-") || id.starts_with("nc-"))
        .collect();
    assert_eq!(
        load_ids.len() as u64,
        sent,
        "every request answered reached the backend"
    );
    let direct: Vec<&&String> = load_ids
        .iter()
        .filter(|(_, through_the_mesh)| !**through_the_mesh)
        .map(|(id, _)| id)
        .collect();
    assert!(
        direct.is_empty(),
        "{} requests bypassed the agent: {direct:?}",
        direct.len()
    );
    let decisions = agent.decisions().unwrap();
    assert_eq!(decisions["agent_absent"], 0, "{decisions:?}");
    assert_eq!(decisions["not_enrolled"], 0, "{decisions:?}");
    // The ingress listener, handed down the line, answers (no Gateway here: 404).
    let answer = mesh
        .node
        .run_on_node(|| {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(INGRESS)?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            std::io::Result::Ok(answer)
        })
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // Every superseded agent drained and left, handing its state on rather than undoing it.
    for mut old in superseded {
        let status = old.process().wait_timeout(Duration::from_secs(40)).unwrap();
        let log = old.stderr_text();
        assert!(status.is_some_and(|s| s.success()), "{log}");
        assert!(log.contains("handed over; exiting"), "{log}");
    }
    assert_eq!(
        attached_programs(mesh.node.cgroup_path()).unwrap(),
        PROGRAMS
    );
    let spread = |mut ms: Vec<u64>| {
        ms.sort_unstable();
        format!(
            "min {} median {} max {}",
            ms[0],
            ms[ms.len() / 2],
            ms[ms.len() - 1]
        )
    };
    eprintln!(
        "{RESTARTS} restarts in {restarting:?} under load: {sent} requests ({rate:.0}/s), 0 \
         failed, 0 direct; \
         switch ms: {}; both agents up ms: {}; decisions: {decisions:?}",
        spread(switches),
        spread(overlaps),
    );
}

/// A light load for the failure modes: 50 requests a second to the service, each on a new
/// connection, until SIGINT.
fn light_load(mesh: &Mesh, prefix: &str) -> PodProcess {
    mesh.load(&LIGHT_LOAD.map(|arg| if arg == "PREFIX" { prefix } else { arg }))
}

const LIGHT_LOAD: [&str; 11] = [
    "--rate",
    "50",
    "--concurrency",
    "5",
    "--count",
    "100000",
    "--request-ids",
    "PREFIX",
    "--quiet",
    "--until-sigint",
    "--close",
];

/// Stops a load started with `--until-sigint`; its summary.
fn stop(mut load: PodProcess) -> Value {
    load.signal(libc::SIGINT).unwrap();
    summary(&mut load, Duration::from_secs(30))
}

/// Requests of the load `prefix` that reached the backend without the mesh's headers.
fn direct(mesh: &Mesh, prefix: &str) -> usize {
    mesh.received()
        .iter()
        .filter(|(id, through_the_mesh)| id.starts_with(prefix) && !**through_the_mesh)
        .count()
}

/// A successor that cannot take over — it would run differently, or it fails to start after
/// it got the inventory — leaves the running agent serving as before: no request lost, its
/// programs in force, and the next successor takes over as usual.
#[test]
fn a_successor_that_cannot_take_over_leaves_the_running_agent_in_charge() {
    let mesh = mesh();
    let mut agent = mesh.agent();
    let binary = mesh_tests::agent_binary().unwrap();
    let load = light_load(&mesh, "fail");
    let programs = attached_program_ids(mesh.node.cgroup_path()).unwrap();

    // Another in-pod port: refused before anything is handed over.
    let mut other = agent
        .spawn_successor(&mesh.node, &binary, &["--listen", "127.0.0.1:15006"])
        .unwrap();
    let status = other.process().finish(TAKE_OVER).unwrap();
    let stderr = other.stderr_text();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("refused to hand over")
            && stderr.contains(
                "it listens at 127.0.0.1:15001 in each pod, the new agent at \
                                127.0.0.1:15006"
            ),
        "{stderr}"
    );

    // Fails after it got the inventory and loaded its programs: its ingress address is taken.
    let _taken = mesh
        .node
        .run_on_node(|| std::net::TcpListener::bind("127.0.0.1:18080").unwrap())
        .unwrap();
    let mut failing = agent
        .spawn_successor(&mesh.node, &binary, &["--ingress", "127.0.0.1:18080"])
        .unwrap();
    let status = failing.process().finish(TAKE_OVER).unwrap();
    let stderr = failing.stderr_text();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("ingress gateway on 127.0.0.1:18080"),
        "{stderr}"
    );
    agent
        .process()
        .stderr()
        .wait_for_line(|l| l.contains("went away before taking over"), TAKE_OVER)
        .unwrap();
    assert_eq!(
        attached_program_ids(mesh.node.cgroup_path()).unwrap(),
        programs,
        "the running agent's programs are still the ones in force"
    );
    // Enrollment, paused while the failed successor held the inventory, works again...
    let spare = mesh.node.add_pod("spare").unwrap();
    let pod = format!(
        r#"{{"name":"spare","netns":"{}"}}"#,
        spare.netns_path().display()
    );
    let (status, body) = agent.admin_request("POST", "/pods", &pod).unwrap();
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_secs(1));

    // ...and the next successor takes over all of it, the pod enrolled at run time included.
    let successor = agent.successor(&mesh.node, &binary, TAKE_OVER).unwrap();
    assert_eq!(
        successor.enrolled().unwrap(),
        ["default/client", "default/spare"]
    );
    std::thread::sleep(Duration::from_secs(1));
    let summary = stop(load);
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(direct(&mesh, "fail-"), 0);
    assert_eq!(successor.decisions().unwrap()["agent_absent"], 0);
}

/// The running agent killed (SIGKILL) after it handed its inventory over but before the
/// successor took over: the successor holds every listener and link already, so the pods'
/// listeners never went away (the kernel never found a pod without its agent) and it carries
/// on alone. Only what the dead agent was serving at that moment is lost.
#[test]
fn a_predecessor_killed_during_the_handover_leaves_its_successor_serving() {
    let mesh = mesh();
    let mut agent = mesh.agent();
    let load = light_load(&mesh, "kill");
    std::thread::sleep(Duration::from_secs(1));
    let successor = agent
        .spawn_successor(&mesh.node, &mesh_tests::agent_binary().unwrap(), &[])
        .unwrap();
    agent
        .process()
        .stderr()
        .wait_for_line(
            |l| l.contains("handed the inventory to a successor"),
            TAKE_OVER,
        )
        .unwrap();
    agent.process().signal(libc::SIGKILL).unwrap();
    let took_over = successor.wait_took_over(TAKE_OVER).unwrap();
    assert!(took_over.contains("outcome=Gone"), "{took_over}");
    assert_eq!(
        attached_programs(mesh.node.cgroup_path()).unwrap(),
        PROGRAMS
    );
    std::thread::sleep(Duration::from_secs(1));
    let summary = stop(load);
    let failed = summary["errors"].as_u64().unwrap();
    // At 50 a second, each answered in milliseconds: what was in flight on the killed agent.
    assert!(failed <= 2, "{summary}");
    assert_eq!(direct(&mesh, "kill-"), 0);
    assert_eq!(successor.decisions().unwrap()["agent_absent"], 0);
    eprintln!("killed during the handover: {failed} requests failed (in flight on it), {summary}");
}

/// Stop then start (a DaemonSet rollout before Kubernetes 1.22): with no successor, SIGTERM
/// unenrolls and the agent detaches; until the next agent has enrolled the pod, its connections
/// go direct (to a pod IP here: a service VIP exists only in the agent on this node, where
/// kube-proxy would route it on a real one). Nothing fails; the gap costs connections outside
/// the mesh.
#[test]
fn stop_then_start_fails_open_for_the_gap() {
    let mesh = mesh();
    let mut agent = mesh.agent();
    let url = format!("http://{}/", mesh.backend.addr(8080));
    let args = LIGHT_LOAD.map(|arg| if arg == "PREFIX" { "gap" } else { arg });
    let load = mesh.load_to(&url, &args);
    std::thread::sleep(Duration::from_secs(1));
    agent.process().signal(libc::SIGTERM).unwrap();
    let status = agent.process().wait_timeout(TAKE_OVER).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        agent.stderr_text()
    );
    assert!(agent.stderr_text().contains("programs detached, exiting"));
    assert_eq!(attached_programs(mesh.node.cgroup_path()).unwrap(), 0);
    let gap = Instant::now();
    let next = mesh.agent();
    let gap = gap.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let summary = stop(load);
    assert_eq!(summary["errors"], 0, "{summary}");
    // One request per connection: each connection an agent carried is one access-log record.
    let carried = [&agent, &next]
        .iter()
        .flat_map(|a| a.access_log())
        .filter(|r| r["kind"] == "tcp" && r["source_pod"] == "client")
        .count() as u64;
    let sent = summary["sent"].as_u64().unwrap();
    let direct = sent - carried;
    assert!(
        direct > 0,
        "no connection went direct during a {gap:?} gap: {summary}"
    );
    eprintln!(
        "stop then start: {direct} of {sent} requests went direct in a {gap:?} gap, 0 failed"
    );
}

/// iptables mode hands over too: the listeners (its rules keep pointing at them), and the
/// rules stay when the superseded agent leaves; the successor removes them at its own exit.
#[test]
fn iptables_mode_hands_over_its_listeners_and_keeps_its_rules() {
    let mesh = mesh();
    let config = mesh.config.path().to_str().unwrap();
    let args = ["--config", config, "--redirect", "iptables"];
    let mut agent = Agent::start(&mesh.node, &[&mesh.client], &args).unwrap();
    let load = light_load(&mesh, "ipt");
    std::thread::sleep(Duration::from_secs(1));
    let mut successor = agent
        .successor(&mesh.node, &mesh_tests::agent_binary().unwrap(), TAKE_OVER)
        .unwrap();
    agent.process().signal(libc::SIGTERM).unwrap();
    let status = agent.process().wait_timeout(TAKE_OVER).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        agent.stderr_text()
    );
    assert!(
        mesh_rules(&mesh),
        "the superseded agent left the rules to its successor"
    );
    std::thread::sleep(Duration::from_secs(1));
    let summary = stop(load);
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(direct(&mesh, "ipt-"), 0);
    successor.process().signal(libc::SIGTERM).unwrap();
    let status = successor.process().wait_timeout(TAKE_OVER).unwrap();
    assert!(status.is_some_and(|s| s.success()));
    assert!(!mesh_rules(&mesh), "the last agent removes the rules");
}

/// Whether the client pod's `nat` table has the agent's chain.
fn mesh_rules(mesh: &Mesh) -> bool {
    let mut save = Command::new("iptables-save");
    save.args(["-t", "nat"]);
    let mut process = mesh.node.spawn_in_pod(&mesh.client, save).unwrap();
    assert!(process.finish(TAKE_OVER).unwrap().success());
    process.stdout().text().contains("MESH_OUTPUT")
}

/// Kubernetes mode, as the DaemonSet's rollout on 1.22+ runs it (new pod first, then SIGTERM to
/// the old): the successor serves the running agent's pods once it has listed the cluster, and
/// from then on it follows the cluster's labels — the superseded agent no longer does.
#[test]
fn in_kubernetes_mode_the_successor_serves_the_pods_and_follows_the_cluster() -> anyhow::Result<()>
{
    use anyhow::{ensure, Context};
    use mesh_tests::{
        control_plane::ControlPlane,
        kubelet::{Kubelet, UPSTREAM_IMAGE},
    };
    const NODE: &str = "node-1";
    const TIMEOUT: Duration = Duration::from_secs(60);

    require_root();
    // Dropped in reverse: the pods, then the control plane, then the node.
    let node = std::sync::Arc::new(SimNode::new()?);
    let control_plane = node.run_on_node(ControlPlane::start)??;
    let kubeconfig = node.run_on_node(|| control_plane.agent_kubeconfig())??;
    let kubelet = Kubelet::start(node.clone(), &control_plane, NODE)?;
    let kubectl = |args: &[&str]| node.run_on_node(|| control_plane.kubectl(args))?;
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: meshed}}\nspec:\n  \
             nodeName: {NODE}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    \
             image: {UPSTREAM_IMAGE}\n    args: [serve, --listen, '0.0.0.0:8080', --name, {name}]\n---\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: meshed, labels: \
         {{sidecarless.io/mesh: enabled}}}}\n---\n{}{}",
        pod("client"),
        pod("server")
    );
    let file = control_plane.dir().join("restart-pods.yaml");
    std::fs::write(&file, yaml)?;
    kubectl(&["apply", "-f", file.to_str().context("UTF-8")?])?;
    let running = |name: &str| {
        mesh_tests::wait_for(&format!("{name} running"), TIMEOUT, || {
            Ok(kubelet.pod("meshed", name).filter(|p| !p.pids.is_empty()))
        })
    };
    let client = running("client")?.pod;
    let server = running("server")?.pod;
    let wait_enrolled = |agent: &Agent, expected: &[&str]| {
        mesh_tests::wait_for(&format!("enrolled: {expected:?}"), TIMEOUT, || {
            Ok((agent.enrolled()? == expected).then_some(()))
        })
    };

    let mut agent = Agent::spawn_kubernetes(&node, &kubeconfig, NODE)?;
    agent.wait_ready(TIMEOUT)?;
    wait_enrolled(&agent, &["meshed/client", "meshed/server"])?;
    let url = format!("http://{}/", server.addr(8080));
    let args = LIGHT_LOAD.map(|arg| if arg == "PREFIX" { "k8s" } else { arg });
    let mut command = upstream(&["get", "--url", &url, "--timeout-secs", "20"]);
    command.args(args);
    let load = node.spawn_in_pod(&client, command)?;
    std::thread::sleep(Duration::from_secs(1));

    let successor = agent.successor(&node, &mesh_tests::agent_binary()?, TIMEOUT)?;
    agent.process().signal(libc::SIGTERM)?;
    wait_enrolled(&successor, &["meshed/client", "meshed/server"])?;
    // A change after the take-over: the successor follows it.
    kubectl(&[
        "-n",
        "meshed",
        "label",
        "pod",
        "server",
        "sidecarless.io/mesh=disabled",
    ])?;
    wait_enrolled(&successor, &["meshed/client"])?;
    std::thread::sleep(Duration::from_secs(1));
    let summary = stop(load);
    ensure!(summary["errors"] == 0, "{summary}");
    // One request per connection: each connection an agent carried is one access-log record.
    let carried = [&agent, &successor]
        .iter()
        .flat_map(|a| a.access_log())
        .filter(|r| r["source_pod"] == "client")
        .count() as u64;
    ensure!(carried == summary["sent"], "{carried} carried: {summary}");
    ensure!(successor.decisions()?["agent_absent"] == 0);
    let status = agent.process().wait_timeout(TIMEOUT)?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "{}",
        agent.stderr_text()
    );
    ensure!(agent.stderr_text().contains("handed over; exiting"));
    Ok(())
}
