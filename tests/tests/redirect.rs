//! The redirect end to end on a simulated node, in both modes: eBPF programs attached to the
//! node's cgroup (the default) and iptables `REDIRECT` rules in each enrolled pod's own `nat`
//! table (`--redirect iptables`), with real pods (network namespaces), processes and the real
//! agent behind them.
//!
//! Where the modes promise the same, one test body runs for each: `<test>::ebpf` and
//! `<test>::iptables`. Where they differ (what a SIGKILL leaves behind, the kernel's counters and
//! maps, the socket fast path, the iptables tools) the test lives in `ebpf::` or `iptables::`.
//! So `cargo test --test redirect iptables` runs everything the iptables mode must do.

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::probe::{curl, probe, start_server};
use mesh_tests::{
    agent::{attached_programs, sum_samples},
    canary::Canary,
    leftovers_of, require_root, Agent, Pod, PodProcess, SimNode,
};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(60);
/// Programs the eBPF mode attaches to the cgroup: connect4, connect6 and sockops.
const EBPF_PROGRAMS: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    /// The agent's `--redirect` value, as `/stats` reports it too.
    fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }

    /// Starts the agent in this mode with `pods` enrolled and `extra` arguments.
    fn start_agent(self, node: &SimNode, pods: &[&Pod], extra: &[&str]) -> Agent {
        let mut args = vec!["--redirect", self.name()];
        args.extend(extra);
        let agent = Agent::start(node, pods, &args).unwrap();
        let stats = agent.stats().unwrap();
        assert_eq!(stats["redirect"], self.name(), "{stats}");
        agent
    }

    /// `mesh-agent run` in this mode on the node, as a plain process (for starts that fail),
    /// with its admin and handover sockets in `sockets`: at the default paths it would meet the
    /// agents of tests running beside it.
    fn agent_command(self, node: &SimNode, sockets: &tempfile::TempDir) -> Command {
        let mut command = Command::new(mesh_tests::agent_binary().unwrap());
        command
            .args(["run", "--redirect", self.name(), "--admin", "127.0.0.1:0"])
            .arg("--cgroup")
            .arg(node.cgroup_path())
            .arg("--admin-socket")
            .arg(sockets.path().join("admin.sock"))
            .arg("--handover-socket")
            .arg(sockets.path().join("handover.sock"));
        command
    }
}

/// Runs a test body once per redirect mode: `mod NAME { fn ebpf(); fn iptables() }`.
macro_rules! each_mode {
    ($(#[doc = $doc:literal])* fn $name:ident($mode:ident: Mode) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            use super::*;

            fn in_mode($mode: Mode) $body

            #[test]
            fn ebpf() {
                require_root();
                in_mode(Mode::Ebpf);
            }

            #[test]
            fn iptables() {
                require_root();
                in_mode(Mode::Iptables);
            }
        }
    };
}

/// A node with a `client` pod and a `server` pod answering `ok` on :8080, and that URL.
fn client_and_ok_server() -> (SimNode, Pod, Pod, PodProcess, String) {
    let (node, client, server, process) =
        client_and_server(&["http-server", "--listen", "0.0.0.0:8080", "--body", "ok"]);
    let url = format!("http://{}/", server.addr(8080));
    (node, client, server, process, url)
}

/// A node with pods `client` and `server`, the latter running `probe` with `server_args`.
fn client_and_server(server_args: &[&str]) -> (SimNode, Pod, Pod, PodProcess) {
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    let process = start_server(&node, &server, server_args);
    (node, client, server, process)
}

/// Runs `command` in `pod` (on the node itself when `None`) to completion: (success, stdout,
/// stderr).
fn attempt(node: &SimNode, pod: Option<&Pod>, command: Command) -> (bool, String, String) {
    let mut process = match pod {
        Some(pod) => node.spawn_in_pod(pod, command).unwrap(),
        None => node.spawn_on_node(command).unwrap(),
    };
    let status = process.finish(TIMEOUT).unwrap();
    (
        status.success(),
        process.stdout().text(),
        process.stderr().text(),
    )
}

/// Runs `command` in `pod` (or on the node) and returns its stdout; panics with its stderr on
/// failure.
fn run(node: &SimNode, pod: Option<&Pod>, command: Command) -> String {
    let (ok, stdout, stderr) = attempt(node, pod, command);
    assert!(ok, "{stderr}");
    stdout
}

/// The pod's `nat` table as `iptables-save` prints it.
fn nat_table(node: &SimNode, pod: &Pod) -> String {
    let mut save = Command::new("iptables-save");
    save.args(["-t", "nat"]);
    run(node, Some(pod), save)
}

/// Lines of the pod's `nat` table that mention the agent's chain.
fn mesh_rules(node: &SimNode, pod: &Pod) -> Vec<String> {
    nat_table(node, pod)
        .lines()
        .filter(|line| line.contains("MESH_"))
        .map(str::to_owned)
        .collect()
}

/// How many jumps to the agent's chain the pod's `nat` table has.
fn jumps(node: &SimNode, pod: &Pod) -> usize {
    nat_table(node, pod).matches("-j MESH_OUTPUT").count()
}

/// Access-log records of proxied TCP connections from `pod`.
fn tcp_records_from(agent: &Agent, pod: &Pod) -> usize {
    agent
        .access_log()
        .iter()
        .filter(|r| r["kind"] == "tcp" && r["source_pod"] == pod.name())
        .count()
}

each_mode! {
    /// The agent dials from the pod's own namespace and knows where each connection was going;
    /// a pod that is not enrolled, and the node itself, go direct.
    fn an_enrolled_pods_request_goes_through_the_agent_and_others_do_not(mode: Mode) {
        let node = SimNode::new().unwrap();
        let client = node.add_pod("client").unwrap();
        let bystander = node.add_pod("bystander").unwrap();
        let server = node.add_pod("server").unwrap();
        let _server = start_server(
            &node,
            &server,
            &["http-server", "--listen", "0.0.0.0:8080", "--body", "hello from server"],
        );
        let agent = mode.start_agent(&node, &[&client], &[]);
        let url = format!("http://{}/", server.addr(8080));

        let response = run(&node, Some(&client), curl(&["-i", &url]));
        assert!(response.ends_with("hello from server"), "{response}");
        // The agent dials from the pod's own namespace: the server sees the pod's address.
        assert!(
            response.contains(&format!("x-peer: {}:", client.ip())),
            "{response}"
        );
        let record = &agent
            .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
            .unwrap()[0];
        assert_eq!(record["source_pod"], "client", "{record}");
        assert_eq!(record["original_dst"], server.addr(8080).to_string());
        assert_eq!(record["error"], Value::Null, "{record}");

        assert!(run(&node, Some(&bystander), curl(&[&url])).ends_with("hello from server"));
        assert!(run(&node, None, curl(&[&url])).ends_with("hello from server"));
        assert_eq!(agent.access_log().len(), 1);

        let stats = agent.stats().unwrap();
        assert_eq!(stats["pods"][0]["name"], "client", "{stats}");
        match mode {
            Mode::Ebpf => {
                let counts = agent.decisions().unwrap();
                assert_eq!(counts["redirected"], 1, "{counts:?}");
                assert_eq!(counts["not_enrolled"], 2, "{counts:?}");
                // Exactly one upstream connection of the agent's own, and it was let through.
                assert_eq!(counts["agent_socket"], 1, "{counts:?}");
                assert_eq!(stats["iptables"], Value::Null, "{stats}");
                assert_eq!(attached_programs(node.cgroup_path()).unwrap(), EBPF_PROGRAMS);
            }
            Mode::Iptables => {
                // No eBPF in this mode: no counters, nothing attached to the node's cgroup.
                assert_eq!(stats["decisions"], Value::Null, "{stats}");
                assert_eq!(stats["cgroup"], Value::Null, "{stats}");
                assert_eq!(stats["iptables"]["pods_with_rules"], 1, "{stats}");
                assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);
                assert_eq!(mesh_rules(&node, &bystander), Vec::<String>::new());
            }
        }
    }
}

each_mode! {
    /// A dual-stack socket (`AF_INET6`, as Java's and many runtimes' are) connecting to an
    /// IPv4-mapped address (`::ffff:a.b.c.d`) is an IPv4 connection: the agent carries it with
    /// the right original destination (eBPF: `connect6` redirects it; iptables: the IPv4 `nat`
    /// rules see it). tests/bypass.rs covers it in depth in eBPF mode.
    fn a_dual_stack_socket_to_an_ipv4_mapped_address_goes_through_the_agent(mode: Mode) {
        let (node, client, server, _process, _) = client_and_ok_server();
        let agent = mode.start_agent(&node, &[&client], &[]);
        let script = format!(
            r#"
import socket
s = socket.create_connection(("{mapped}", 8080), timeout=5)
assert s.family == socket.AF_INET6, s.family
print(s.getsockname()[1], flush=True)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
answer = b""
while chunk := s.recv(4096):
    answer += chunk
print(answer.decode())
"#,
            mapped = server.ip().to_ipv6_mapped()
        );
        let mut python = Command::new("python3");
        python.args(["-c", &script]);
        let output = run(&node, Some(&client), python);
        let (port, response) = output.split_once('\n').unwrap();
        assert!(response.trim_end().ends_with("ok"), "{output}");
        let port: u64 = port.parse().unwrap();
        let records = agent
            .wait_for_records(1, |r| r["kind"] == "tcp" && r["client_port"] == port, TIMEOUT)
            .unwrap();
        assert_eq!(records[0]["source_pod"], "client", "{}", records[0]);
        assert_eq!(records[0]["original_dst"], server.addr(8080).to_string());
        if mode == Mode::Ebpf {
            assert_eq!(agent.decisions().unwrap()["redirected"], 1);
        }
    }
}

each_mode! {
    /// Every byte of many parallel connections from several pods comes back intact, and the
    /// agent attributes each connection to the right pod and original destination.
    fn many_pods_many_connections_are_intact_and_attributed_exactly(mode: Mode) {
        const CONNS: usize = 200;
        const BYTES: usize = 1 << 20;
        let node = SimNode::new().unwrap();
        let clients: Vec<Pod> = (0..3)
            .map(|i| node.add_pod(&format!("client-{i}")).unwrap())
            .collect();
        let server = node.add_pod("server").unwrap();
        let _server = start_server(&node, &server, &["echo-server", "--listen", "0.0.0.0:7000"]);
        let agent = mode.start_agent(&node, &clients.iter().collect::<Vec<_>>(), &[]);
        let to = server.addr(7000).to_string();

        let (conns, bytes) = (CONNS.to_string(), BYTES.to_string());
        let mut echoes: Vec<PodProcess> = clients
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let seed = i.to_string();
                let args = [
                    "echo-client", "--to", &to, "--conns", &conns, "--bytes", &bytes, "--seed",
                    &seed,
                ];
                node.spawn_in_pod(pod, probe(&args)).unwrap()
            })
            .collect();
        // (source pod, client port) → what the client saw.
        let mut sent: HashMap<(String, u64), Value> = HashMap::new();
        for (pod, echo) in clients.iter().zip(&mut echoes) {
            let status = echo.finish(TIMEOUT).unwrap();
            let lines = echo.stdout().json_lines();
            assert!(status.success(), "{}: {}", pod.name(), echo.stderr().text());
            let (summary, reports) = lines.split_last().unwrap();
            assert_eq!(summary["ok"], CONNS, "{summary}");
            for report in reports {
                assert_eq!(report["sent_sha256"], report["recv_sha256"], "{report}");
                let port = report["local_port"].as_u64().unwrap();
                sent.insert((pod.name().to_owned(), port), report.clone());
            }
        }
        assert_eq!(sent.len(), 3 * CONNS);

        let records = agent
            .wait_for_records(3 * CONNS, |r| r["kind"] == "tcp", TIMEOUT)
            .unwrap();
        assert_eq!(records.len(), 3 * CONNS);
        for record in &records {
            let key = (
                record["source_pod"].as_str().unwrap().to_owned(),
                record["client_port"].as_u64().unwrap(),
            );
            assert!(
                sent.remove(&key).is_some(),
                "record for a connection no client made: {record}"
            );
            assert_eq!(record["original_dst"], to, "{record}");
            assert_eq!(record["sent_bytes"], BYTES, "{record}");
            assert_eq!(record["received_bytes"], BYTES, "{record}");
        }
        assert!(sent.is_empty(), "connections the agent did not report: {sent:?}");
        if mode == Mode::Ebpf {
            let counts = agent.decisions().unwrap();
            assert_eq!(counts["redirected"], 3 * CONNS as u64, "{counts:?}");
            assert_eq!(counts["agent_socket"], 3 * CONNS as u64, "{counts:?}");
        }
    }
}

each_mode! {
    /// Enrolling and unenrolling through the admin API takes effect for new connections at
    /// once, touches only that pod, and can be repeated.
    fn pods_are_enrolled_and_unenrolled_at_run_time(mode: Mode) {
        let (node, client, _server, _process, url) = client_and_ok_server();
        let other = node.add_pod("other").unwrap();
        let agent = mode.start_agent(&node, &[&other], &[]);
        let enroll = format!(
            r#"{{"name":"client","netns":"{}"}}"#,
            client.netns_path().display()
        );

        let (status, answer) = agent.admin_request("POST", "/pods", &enroll).unwrap();
        assert_eq!(status, 200, "{answer}");
        assert!(run(&node, Some(&client), curl(&[&url])).ends_with("ok"));
        agent
            .wait_for_records(1, |r| r["source_pod"] == "client", TIMEOUT)
            .unwrap();

        let (status, answer) = agent.admin_request("DELETE", "/pods/client", "").unwrap();
        assert_eq!(status, 200, "{answer}");
        // The unenrolled pod goes direct: the agent sees nothing of it.
        assert!(run(&node, Some(&client), curl(&[&url])).ends_with("ok"));
        assert_eq!(tcp_records_from(&agent, &client), 1);
        let (status, _) = agent.admin_request("DELETE", "/pods/client", "").unwrap();
        assert_eq!(status, 404);
        match mode {
            Mode::Ebpf => {
                let counts = agent.decisions().unwrap();
                assert_eq!(
                    (counts["redirected"], counts["not_enrolled"]),
                    (1, 1),
                    "{counts:?}"
                );
            }
            Mode::Iptables => {
                assert_eq!(mesh_rules(&node, &client), Vec::<String>::new());
                assert!(!mesh_rules(&node, &other).is_empty(), "the other pod's rules went too");
            }
        }

        // Enrolled again: through the agent again (iptables: the rules are back, once).
        let (status, answer) = agent.admin_request("POST", "/pods", &enroll).unwrap();
        assert_eq!(status, 200, "{answer}");
        if mode == Mode::Iptables {
            assert_eq!(jumps(&node, &client), 1);
        }
        assert!(run(&node, Some(&client), curl(&[&url])).ends_with("ok"));
        agent
            .wait_for_records(2, |r| r["source_pod"] == "client", TIMEOUT)
            .unwrap();
    }
}

each_mode! {
    /// SIGTERM undoes the redirect for every pod still enrolled, the pods then go direct, and
    /// the node leaves no namespace, link, cgroup or pin behind.
    fn a_clean_exit_removes_the_redirect_and_the_node_leaves_nothing_behind(mode: Mode) {
        let (node, client, _server, process, url) = client_and_ok_server();
        let other = node.add_pod("other").unwrap();
        let node_id = node.id();
        let mut agent = mode.start_agent(&node, &[&client, &other], &[]);
        if mode == Mode::Ebpf {
            assert_eq!(attached_programs(node.cgroup_path()).unwrap(), EBPF_PROGRAMS);
        } else {
            for pod in [&client, &other] {
                let rules = mesh_rules(&node, pod);
                assert!(
                    rules.contains(&"-A OUTPUT -p tcp -j MESH_OUTPUT".to_owned())
                        && rules.iter().any(|r| r.contains("REDIRECT --to-ports 15001")),
                    "{}: {rules:?}",
                    pod.name()
                );
            }
        }

        let status = agent.process().stop(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "{status}: {}", agent.stderr_text());
        let said = match mode {
            Mode::Ebpf => "programs detached",
            Mode::Iptables => "iptables rules removed",
        };
        assert!(agent.stderr_text().contains(said), "{}", agent.stderr_text());
        assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);
        for pod in [&client, &other] {
            assert_eq!(mesh_rules(&node, pod), Vec::<String>::new(), "{}", pod.name());
            assert!(run(&node, Some(pod), curl(&[&url])).ends_with("ok"));
        }
        // The agent never pins: nothing of ours under a mounted bpffs.
        if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
            let ours: Vec<_> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().to_lowercase().contains("mesh"))
                .collect();
            assert!(ours.is_empty(), "pinned: {ours:?}");
        }
        drop((agent, process));
        drop(node);
        assert_eq!(leftovers_of(&node_id), Vec::<String>::new());
    }
}

each_mode! {
    /// A start that fails after enrolling one pod (the second names the first one's network
    /// namespace again) leaves nothing attached and no rules behind.
    fn a_start_that_fails_halfway_leaves_nothing_behind(mode: Mode) {
        let node = SimNode::new().unwrap();
        let client = node.add_pod("client").unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let mut command = mode.agent_command(&node, &sockets);
        command
            .arg("--enroll")
            .arg(format!("client={}", client.netns_path().display()))
            .arg("--enroll")
            .arg(format!("twin={}", client.netns_path().display()));
        let mut agent = node.spawn_on_node(command).unwrap();
        let status = agent.finish(TIMEOUT).unwrap();
        let stderr = agent.stderr().text();
        assert!(!status.success(), "the agent started: {stderr}");
        assert!(stderr.contains("pod twin"), "{stderr}");
        // The first pod was enrolled before the second failed; it went with the agent.
        assert_eq!(mesh_rules(&node, &client), Vec::<String>::new());
        assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);
    }
}

each_mode! {
    /// The same engine behind both modes: a 90/10 VirtualService split over a service VIP holds,
    /// and every request is counted in the Istio metrics.
    fn a_ninety_ten_split_over_a_service_vip_holds(mode: Mode) {
        const REQUESTS: u64 = 200;
        let node = SimNode::new().unwrap();
        let canary = Canary::start(&node, UPSTREAM, "canary/2-vs-v1_and_v2_90_10.yml").unwrap();
        let client = &canary.client;
        let config_path = canary.config.path().to_str().unwrap();
        let agent = mode.start_agent(&node, &[client], &["--config", config_path]);

        let count = REQUESTS.to_string();
        let mut get = Command::new(UPSTREAM);
        get.args(["get", "--url", "http://service-c:8080/", "--count", &count]);
        get.args(["--concurrency", "4", "--quiet"]);
        let summary: Value = run(&node, Some(client), get)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .rfind(|line| line["summary"] == true)
            .expect("the client printed no summary");
        let by_body = |version: &str| summary["by_body"][version].as_u64().unwrap_or(0);
        let (v1, v2) = (by_body("v1"), by_body("v2"));
        println!("{mode:?} mode, 90/10 over {REQUESTS} requests: v1={v1} v2={v2}");
        assert_eq!(v1 + v2, REQUESTS, "{summary}");
        // 90 % ± 5 points.
        assert!((170..=190).contains(&v1), "{summary}");

        let (status, metrics) = agent.admin_get("/metrics").unwrap();
        assert_eq!(status, 200);
        let lines = metrics.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
        let requests: f64 = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "istio_requests_total")
            .filter(|s| {
                s.labels.get("destination_service") == Some("service-c.default.svc.cluster.local")
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum();
        assert_eq!(requests, REQUESTS as f64, "{metrics}");
        // Kiali's graph draws the canary from the canonical revision: the split as answered.
        let by_revision = |revision: &str| {
            sum_samples(
                &metrics,
                "istio_requests_total",
                &[
                    ("destination_canonical_service", "service-c"),
                    ("destination_canonical_revision", revision),
                ],
            )
        };
        assert_eq!(
            (by_revision("v1"), by_revision("v2")),
            (v1 as f64, v2 as f64),
            "{metrics}"
        );
        // Kernel counters exist only in eBPF mode.
        assert_eq!(
            metrics.contains("mesh_redirect_decisions"),
            mode == Mode::Ebpf,
            "{metrics}"
        );
        // Enrollment keeps its own gauge: the one enrolled client pod.
        assert!(metrics.contains("mesh_enrolled_pods 1"), "{metrics}");
    }
}

/// After a SIGKILL, a new agent takes over the pod again: connections go through it, with the
/// right original destination.
fn a_restarted_agent_takes_over(mode: Mode, node: &SimNode, client: &Pod, server: &Pod) {
    let restarted = mode.start_agent(node, &[client], &[]);
    if mode == Mode::Iptables {
        // The stale rules were replaced, not added to.
        assert_eq!(jumps(node, client), 1);
    }
    let url = format!("http://{}/", server.addr(8080));
    assert!(run(node, Some(client), curl(&[&url])).ends_with("ok"));
    let record = &restarted
        .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
        .unwrap()[0];
    assert_eq!(record["original_dst"], server.addr(8080).to_string());
    if mode == Mode::Ebpf {
        assert_eq!(restarted.decisions().unwrap()["redirected"], 1);
    }
}

/// What only the eBPF mode promises.
mod ebpf {
    use super::*;

    #[test]
    fn a_killed_agent_fails_open_and_a_restarted_one_takes_over_again() {
        require_root();
        let (node, client, server, _server, url) = client_and_ok_server();
        let mut agent = Mode::Ebpf.start_agent(&node, &[&client], &[]);
        run(&node, Some(&client), curl(&[&url]));
        agent
            .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
            .unwrap();

        agent.process().signal(libc::SIGKILL).unwrap();
        let killed = Instant::now();
        agent.process().wait_timeout(TIMEOUT).unwrap();
        // New connections succeed directly, from the first try on.
        let (ok, _, stderr) = attempt(&node, Some(&client), curl(&["--max-time", "1", &url]));
        assert!(ok, "{stderr}");
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "fail-open took {:?}",
            killed.elapsed()
        );
        assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);

        a_restarted_agent_takes_over(Mode::Ebpf, &node, &client, &server);
    }

    /// The original-destination maps hold only connections still open: after 10,000 short
    /// connections have closed, at most this many entries remain (connections whose close the
    /// kernel has not finished yet). LRU capacity bounds them in any case.
    const MAP_ENTRIES_AFTER_CLOSE: u64 = 16;

    #[test]
    fn original_destination_maps_stay_bounded_after_ten_thousand_connections() {
        require_root();
        let (node, client, server, _server, _) = client_and_ok_server();
        let agent = Mode::Ebpf.start_agent(&node, &[&client], &[]);
        let url = format!("http://{}/[1-10000]", server.addr(8080));
        let out = run(
            &node,
            Some(&client),
            curl(&[
                "-H",
                "Connection: close",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\\n",
                &url,
            ]),
        );
        assert_eq!(out.lines().filter(|l| *l == "200").count(), 10_000, "{out}");
        assert_eq!(agent.decisions().unwrap()["redirected"], 10_000);

        let deadline = Instant::now() + Duration::from_secs(10);
        let (pending, established) = loop {
            let stats = agent.stats().unwrap();
            let entries = &stats["original_dst_entries"];
            let (pending, established) = (
                entries["pending"].as_u64().unwrap(),
                entries["established"].as_u64().unwrap(),
            );
            if pending + established <= MAP_ENTRIES_AFTER_CLOSE || Instant::now() > deadline {
                break (pending, established);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        println!("after 10,000 connections: {pending} pending, {established} established entries");
        assert!(
            pending + established <= MAP_ENTRIES_AFTER_CLOSE,
            "{pending} + {established}"
        );
    }

    /// The eBPF agent with `client` enrolled, with or without `--socket-fast-path`.
    fn start_agent_with_fast_path(node: &SimNode, client: &Pod, fast_path: bool) -> Agent {
        let flags: &[&str] = if fast_path {
            &["--socket-fast-path"]
        } else {
            &[]
        };
        Mode::Ebpf.start_agent(node, &[client], flags)
    }

    /// `--socket-fast-path`: both ends of every redirected connection (the pod's socket and the
    /// agent's in-pod socket) join the kernel's socket map, and keep-alive HTTP still works
    /// through it; without the flag no socket joins. The client uses sockets with a timeout,
    /// which Python drives non-blocking with poll, as event-loop clients do (a blocking reader
    /// is not safe on this path: the test after this one). One of the
    /// three is a dual-stack socket connected to the server's IPv4-mapped address.
    #[test]
    fn the_socket_fast_path_carries_both_ends_of_each_redirected_connection() {
        require_root();
        let (node, client, server, _server, _) = client_and_ok_server();
        let script = format!(
            r#"
import socket, sys, time
held = []
for host in ["{ip}", "{ip}", "::ffff:{ip}"]:
    s = socket.create_connection((host, 8080), timeout=10)
    for _ in range(50):
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok"):
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("closed early: %r" % answer)
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
    held.append(s)
print("ready", flush=True)
time.sleep(3)
"#,
            ip = server.ip()
        );
        for fast_path in [false, true] {
            let agent = start_agent_with_fast_path(&node, &client, fast_path);
            let mut python = Command::new("python3");
            python.args(["-c", &script]);
            let mut python = node.spawn_in_pod(&client, python).unwrap();
            python
                .stdout()
                .wait_for_line(|line| line == "ready", TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}: {}", python.stderr().text()));
            let stats = agent.stats().unwrap();
            let expected = if fast_path { 6 } else { 0 };
            assert_eq!(
                stats["fast_path_sockets"], expected,
                "fast path {fast_path}: {stats}"
            );
            assert_eq!(stats["decisions"]["redirected"], 3, "{stats}");
            let status = python.finish(TIMEOUT).unwrap();
            assert!(status.success(), "{}", python.stderr().text());
        }
    }

    /// Why the socket fast path is opt-in (docs/architecture.md, "The socket fast path"): a
    /// socket in the kernel's socket map reads through `tcp_bpf_recvmsg`, which waits for data
    /// once and returns `EAGAIN` if it is woken with none. Its own FIN's ACK wakes a reader
    /// (the state change to FIN_WAIT2), so a *blocking* reader asleep in `recv` while another
    /// thread shuts the socket's write side gets `EAGAIN` instead of waiting for the peer's
    /// answer or FIN: in Python and in C. Java's sockets (`NioSocketImpl`, JDK 13 on) poll and
    /// read again on `EAGAIN` and see the end of the stream, as every reader does without the
    /// fast path. Pinned so that a kernel that stops doing it fails here: then the fast path
    /// can become the default.
    #[test]
    fn a_blocking_reader_on_the_socket_fast_path_is_woken_into_eagain_by_its_own_fin() {
        require_root();
        let (node, client, server, _echo) =
            client_and_server(&["echo-server", "--listen", "0.0.0.0:8080"]);
        let dir = tempfile::tempdir().unwrap();
        let c_source = dir.path().join("blocking_reader.c");
        let c_reader = dir.path().join("blocking_reader");
        std::fs::write(&c_source, C_BLOCKING_READER).unwrap();
        let built = Command::new("cc")
            .args(["-O2", "-pthread", "-o"])
            .args([&c_reader, &c_source])
            .status()
            .unwrap();
        assert!(built.success(), "cc {}", c_source.display());
        let java_source = dir.path().join("BlockingReader.java");
        std::fs::write(&java_source, JAVA_BLOCKING_READER).unwrap();
        let target = [server.ip().to_string(), "8080".into(), ROUNDS.to_string()];
        let reader = |language: &str| {
            let mut command = match language {
                "python" => {
                    let mut python = Command::new("python3");
                    python.args(["-c", PYTHON_BLOCKING_READER]);
                    python
                }
                "c" => Command::new(&c_reader),
                _ => {
                    let mut java = Command::new("java");
                    java.arg(&java_source);
                    java
                }
            };
            command.args(&target);
            command
        };
        for fast_path in [false, true] {
            let _agent = start_agent_with_fast_path(&node, &client, fast_path);
            for language in ["python", "c", "java"] {
                let out = run(&node, Some(&client), reader(language));
                let count = |what: &str| out.lines().filter(|l| *l == what).count();
                let (eagain, end) = (count("eagain"), count("eof"));
                eprintln!(
                    "fast path {fast_path}, {language}: {eagain} EAGAIN, {end} end of stream"
                );
                assert_eq!(eagain + end, ROUNDS, "{language}: {out}");
                if fast_path && language != "java" {
                    // At least once: on a loaded machine the write side may be shut before the
                    // reader is asleep, and then it waits for the peer's FIN as it should.
                    assert!(
                        eagain > 0,
                        "{language}: no spurious EAGAIN on the fast path any more; it may become \
                         the default: {out}"
                    );
                } else {
                    assert_eq!(eagain, 0, "fast path {fast_path}, {language}: {out}");
                }
            }
        }
    }

    /// Connections each blocking reader opens.
    const ROUNDS: usize = 10;

    /// Each reader: for each of ROUNDS blocking connections to IP:PORT, a thread asleep in a
    /// read while the main thread shuts the write side 50 ms later; prints what the read gave:
    /// `eof`, `eagain`, `data` or the error.
    const PYTHON_BLOCKING_READER: &str = r#"
import socket, sys, threading, time
host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(rounds):
    s = socket.create_connection((host, port))
    assert s.getblocking()
    result = ["no answer"]
    def read():
        try:
            result[0] = "eof" if s.recv(100) == b"" else "data"
        except BlockingIOError:
            result[0] = "eagain"
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.05)
    s.shutdown(socket.SHUT_WR)
    reader.join(10)
    print(result[0], flush=True)
    s.close()
"#;

    const C_BLOCKING_READER: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fd;
static char result[64];

static void *reader(void *unused) {
    char buf[100];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0) strcpy(result, "eof");
    else if (n > 0) strcpy(result, "data");
    else if (errno == EAGAIN) strcpy(result, "eagain");
    else snprintf(result, sizeof result, "error %s", strerror(errno));
    return unused;
}

int main(int argc, char **argv) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &to.sin_addr);
    for (int i = 0; i < atoi(argv[3]); i++) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&to, sizeof to) != 0) {
            perror("connect");
            return 1;
        }
        pthread_t thread;
        pthread_create(&thread, NULL, reader, NULL);
        usleep(50000);
        shutdown(fd, SHUT_WR);
        pthread_join(thread, NULL);
        printf("%s\n", result);
        fflush(stdout);
        close(fd);
    }
    return 0;
}
"#;

    const JAVA_BLOCKING_READER: &str = r#"
import java.net.Socket;

public class BlockingReader {
    public static void main(String[] args) throws Exception {
        for (int i = 0; i < Integer.parseInt(args[2]); i++) {
            try (Socket socket = new Socket(args[0], Integer.parseInt(args[1]))) {
                String[] result = {"no answer"};
                Thread reader = new Thread(() -> {
                    try {
                        result[0] = socket.getInputStream().read(new byte[100]) < 0 ? "eof" : "data";
                    } catch (Exception e) {
                        result[0] = "error " + e;
                    }
                });
                reader.start();
                Thread.sleep(50);
                socket.shutdownOutput();
                reader.join(10000);
                System.out.println(result[0]);
            }
        }
    }
}
"#;
}

/// What only the iptables mode does.
mod iptables {
    use super::*;

    /// The known weakness of this mode, pinned so that a change to it updates the docs: the
    /// rules can only see `SO_MARK`, so a pod that marks its socket like the agent's
    /// (`CAP_NET_ADMIN` in its own namespace is enough) goes around the agent. eBPF mode
    /// exempts by socket cookie instead (tests/bypass.rs).
    #[test]
    fn a_pod_setting_the_agent_mark_skips_the_mesh() {
        require_root();
        let (node, client, server, _server, url) = client_and_ok_server();
        let agent = Mode::Iptables.start_agent(&node, &[&client], &[]);
        let script = format!(
            r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x4d455348)
s.settimeout(5)
s.connect(("{ip}", 8080))
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
answer = b""
while chunk := s.recv(4096):
    answer += chunk
print(answer.decode())
"#,
            ip = server.ip()
        );
        let mut python = Command::new("python3");
        python.args(["-c", &script]);
        assert!(run(&node, Some(&client), python).trim_end().ends_with("ok"));
        // An unmarked request after it is carried: had the marked one been, it would be first.
        assert!(run(&node, Some(&client), curl(&[&url])).ends_with("ok"));
        let records = agent
            .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
            .unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(tcp_records_from(&agent, &client), 1);
    }

    #[test]
    fn a_killed_agent_leaves_rules_that_fail_closed_until_a_restart_replaces_them() {
        require_root();
        let (node, client, server, _server, url) = client_and_ok_server();
        let mut agent = Mode::Iptables.start_agent(&node, &[&client], &[]);
        assert!(run(&node, Some(&client), curl(&[&url])).ends_with("ok"));

        // The known weakness of this mode: nothing removes the rules of a SIGKILLed agent, and
        // they point at a listener that is gone.
        agent.process().signal(libc::SIGKILL).unwrap();
        agent.process().wait_timeout(TIMEOUT).unwrap();
        assert!(!mesh_rules(&node, &client).is_empty());
        let (ok, _, stderr) = attempt(&node, Some(&client), curl(&["--max-time", "2", &url]));
        assert!(!ok, "a connection succeeded with the agent dead");
        // Refused at once by the pod's own loopback (curl: "Couldn't connect"), not a timeout.
        assert!(stderr.contains("Failed to connect"), "{stderr}");

        a_restarted_agent_takes_over(Mode::Iptables, &node, &client, &server);
    }

    #[test]
    fn without_iptables_restore_on_path_the_agent_refuses_with_a_clear_message() {
        require_root();
        let node = SimNode::new().unwrap();
        let client = node.add_pod("client").unwrap();
        let empty = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let mut command = Mode::Iptables.agent_command(&node, &sockets);
        command
            .arg("--enroll")
            .arg(format!("client={}", client.netns_path().display()))
            .env("PATH", empty.path());
        let mut agent = node.spawn_on_node(command).unwrap();
        let status = agent.finish(TIMEOUT).unwrap();
        let stderr = agent.stderr().text();
        assert!(!status.success(), "the agent started: {stderr}");
        assert!(
            stderr.contains("--redirect iptables needs `iptables-restore`")
                && stderr.contains("apt-get install iptables"),
            "{stderr}"
        );
        // Refused before enrolling anything.
        assert_eq!(mesh_rules(&node, &client), Vec::<String>::new());
    }
}
