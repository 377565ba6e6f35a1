//! The iptables fallback (`mesh-agent run --redirect iptables`) end to end on a simulated node:
//! no eBPF, a `REDIRECT` chain in each enrolled pod's own `nat` table, original destinations
//! from conntrack, the same agent and engine behind them.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use mesh_tests::probe::{curl, probe, start_server};
use mesh_tests::{
    agent::attached_programs, require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode,
};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(60);
const SERVICE_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const IPTABLES: &[&str] = &["--redirect", "iptables"];

/// Runs `command` in `pod` to completion: (success, stdout, stderr).
fn attempt(node: &SimNode, pod: &Pod, command: Command) -> (bool, String, String) {
    let mut process = node.spawn_in_pod(pod, command).unwrap();
    let status = process.finish(TIMEOUT).unwrap();
    (
        status.success(),
        process.stdout().text(),
        process.stderr().text(),
    )
}

/// Runs `command` in `pod` and returns its stdout; panics with its stderr on failure.
fn run(node: &SimNode, pod: &Pod, command: Command) -> String {
    let (ok, stdout, stderr) = attempt(node, pod, command);
    assert!(ok, "{stderr}");
    stdout
}

/// The pod's `nat` table as `iptables-save` prints it.
fn nat_table(node: &SimNode, pod: &Pod) -> String {
    let mut save = Command::new("iptables-save");
    save.args(["-t", "nat"]);
    run(node, pod, save)
}

/// Lines of the pod's `nat` table that mention the agent's chain.
fn mesh_rules(node: &SimNode, pod: &Pod) -> Vec<String> {
    nat_table(node, pod)
        .lines()
        .filter(|line| line.contains("MESH_"))
        .map(str::to_owned)
        .collect()
}

fn tcp_records(agent: &Agent) -> Vec<Value> {
    agent
        .access_log()
        .into_iter()
        .filter(|r| r["kind"] == "tcp")
        .collect()
}

#[test]
fn an_enrolled_pods_connections_go_through_the_agent_intact_and_a_bystander_is_untouched() {
    require_root();
    const CONNS: usize = 100;
    const BYTES: usize = 64 << 10;
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let bystander = node.add_pod("bystander").unwrap();
    let server = node.add_pod("server").unwrap();
    let _http = start_server(
        &node,
        &server,
        &["http-server", "--listen", "0.0.0.0:8080", "--body", "hello"],
    );
    let _echo = start_server(&node, &server, &["echo-server", "--listen", "0.0.0.0:7000"]);
    let agent = Agent::start(&node, &[&client], IPTABLES).unwrap();
    // No eBPF in this mode: nothing attached to the node's cgroup.
    assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);
    let stats = agent.stats().unwrap();
    assert_eq!(stats["redirect"], "iptables", "{stats}");
    assert_eq!(stats["decisions"], Value::Null, "{stats}");
    assert_eq!(stats["cgroup"], Value::Null, "{stats}");
    assert_eq!(stats["iptables"]["pods_with_rules"], 1, "{stats}");
    assert_eq!(stats["pods"][0]["name"], "client", "{stats}");

    let url = format!("http://{}/", server.addr(8080));
    let response = run(&node, &client, curl(&["-i", &url]));
    assert!(response.ends_with("hello"), "{response}");
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

    // A pod that is not enrolled has no rules of ours, and goes direct.
    assert_eq!(mesh_rules(&node, &bystander), Vec::<String>::new());
    assert!(run(&node, &bystander, curl(&[&url])).ends_with("hello"));
    assert_eq!(tcp_records(&agent).len(), 1);

    // Many connections: every byte echoed back, every one seen by the agent with the right
    // original destination.
    let to = server.addr(7000).to_string();
    let (conns, bytes) = (CONNS.to_string(), BYTES.to_string());
    let echo_args = [
        "echo-client",
        "--to",
        &to,
        "--conns",
        &conns,
        "--bytes",
        &bytes,
    ];
    let lines: Vec<Value> = run(&node, &client, probe(&echo_args))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let (summary, reports) = lines.split_last().unwrap();
    assert_eq!(summary["ok"], CONNS, "{summary}");
    for report in reports {
        assert_eq!(report["sent_sha256"], report["recv_sha256"], "{report}");
    }
    let records = agent
        .wait_for_records(
            CONNS,
            |r| r["kind"] == "tcp" && r["original_dst"] == to.as_str(),
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(records.len(), CONNS);
    for record in &records {
        assert_eq!(record["source_pod"], "client", "{record}");
        assert_eq!(record["sent_bytes"], BYTES, "{record}");
        assert_eq!(record["received_bytes"], BYTES, "{record}");
    }
    assert_eq!(tcp_records(&agent).len(), 1 + CONNS);
}

#[test]
fn a_ninety_ten_split_over_a_service_vip_holds() {
    require_root();
    const REQUESTS: u64 = 200;
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let c_v1 = node.add_pod("service-c-v1-0").unwrap();
    let c_v2 = node.add_pod("service-c-v2-0").unwrap();
    node.add_host("service-c", SERVICE_C).unwrap();
    let _servers: Vec<PodProcess> = [(&c_v1, "v1"), (&c_v2, "v2")]
        .into_iter()
        .map(|(pod, name)| {
            let serve = ["serve", "--listen", "0.0.0.0:8080", "--name", name];
            let mut command = Command::new(UPSTREAM);
            command.args(serve);
            let server = node.spawn_in_pod(pod, command).unwrap();
            server
                .stdout()
                .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
                .unwrap();
            server
        })
        .collect();
    let config = ConfigDir::new().unwrap();
    let backend = |pod, version| Backend {
        pod,
        labels: if version == "v1" {
            &[("app", "service-c"), ("version", "v1")]
        } else {
            &[("app", "service-c"), ("version", "v2")]
        },
    };
    config
        .service(
            "service-c",
            SERVICE_C,
            8080,
            "http",
            &[backend(&c_v1, "v1"), backend(&c_v2, "v2")],
        )
        .unwrap();
    config
        .copy_example("destination-rules.yml", "destination-rules.yml")
        .unwrap();
    config
        .copy_example("canary/2-vs-v1_and_v2_90_10.yml", "vs.yml")
        .unwrap();
    let config_path = config.path().to_str().unwrap();
    let mut args = IPTABLES.to_vec();
    args.extend(["--config", config_path]);
    let agent = Agent::start(&node, &[&client], &args).unwrap();

    let count = REQUESTS.to_string();
    let mut get = Command::new(UPSTREAM);
    get.args(["get", "--url", "http://service-c:8080/", "--count", &count]);
    get.args(["--concurrency", "4", "--quiet"]);
    let summary: Value = run(&node, &client, get)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .rfind(|line| line["summary"] == true)
        .expect("the client printed no summary");
    let by_body = |version: &str| summary["by_body"][version].as_u64().unwrap_or(0);
    let (v1, v2) = (by_body("v1"), by_body("v2"));
    println!("iptables mode, 90/10 over {REQUESTS} requests: v1={v1} v2={v2}");
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
    // No kernel counters in this mode, so no such metric.
    assert!(!metrics.contains("mesh_redirect_decisions"), "{metrics}");
}

#[test]
fn unenroll_and_a_clean_exit_remove_the_rules() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let other = node.add_pod("other").unwrap();
    let server = node.add_pod("server").unwrap();
    let _server = start_server(
        &node,
        &server,
        &["http-server", "--listen", "0.0.0.0:8080", "--body", "ok"],
    );
    let url = format!("http://{}/", server.addr(8080));
    let mut agent = Agent::start(&node, &[&client, &other], IPTABLES).unwrap();
    for pod in [&client, &other] {
        let rules = mesh_rules(&node, pod);
        assert!(
            rules.contains(&"-A OUTPUT -p tcp -j MESH_OUTPUT".to_owned())
                && rules
                    .iter()
                    .any(|r| r.contains("REDIRECT --to-ports 15001")),
            "{}: {rules:?}",
            pod.name()
        );
    }

    let (status, answer) = agent.admin_request("DELETE", "/pods/client", "").unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(mesh_rules(&node, &client), Vec::<String>::new());
    assert!(!mesh_rules(&node, &other).is_empty());
    // The unenrolled pod goes direct: the agent sees nothing of it.
    assert!(run(&node, &client, curl(&[&url])).ends_with("ok"));
    assert_eq!(tcp_records(&agent).len(), 0);
    let (status, _) = agent.admin_request("DELETE", "/pods/client", "").unwrap();
    assert_eq!(status, 404);

    // Enrolled again at run time: the rules are back, once.
    let body = format!(
        r#"{{"name":"client","netns":"{}"}}"#,
        client.netns_path().display()
    );
    let (status, answer) = agent.admin_request("POST", "/pods", &body).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        nat_table(&node, &client).matches("-j MESH_OUTPUT").count(),
        1
    );
    assert!(run(&node, &client, curl(&[&url])).ends_with("ok"));
    agent
        .wait_for_records(1, |r| r["source_pod"] == "client", TIMEOUT)
        .unwrap();

    // SIGTERM: every pod still enrolled is cleaned up before the agent exits.
    let status = agent.process().stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", agent.stderr_text());
    assert!(agent.stderr_text().contains("iptables rules removed"));
    for pod in [&client, &other] {
        assert_eq!(
            mesh_rules(&node, pod),
            Vec::<String>::new(),
            "{}",
            pod.name()
        );
        assert!(run(&node, pod, curl(&[&url])).ends_with("ok"));
    }
}

#[test]
fn a_killed_agent_leaves_rules_that_fail_closed_until_a_restart_replaces_them() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    let _server = start_server(
        &node,
        &server,
        &["http-server", "--listen", "0.0.0.0:8080", "--body", "ok"],
    );
    let url = format!("http://{}/", server.addr(8080));
    let mut agent = Agent::start(&node, &[&client], IPTABLES).unwrap();
    assert!(run(&node, &client, curl(&[&url])).ends_with("ok"));

    // The known weakness of this mode: nothing removes the rules of a SIGKILLed agent, and they
    // point at a listener that is gone.
    agent.process().signal(libc::SIGKILL).unwrap();
    agent.process().wait_timeout(TIMEOUT).unwrap();
    assert!(!mesh_rules(&node, &client).is_empty());
    let (ok, _, stderr) = attempt(&node, &client, curl(&["--max-time", "2", &url]));
    assert!(!ok, "a connection succeeded with the agent dead");
    // Refused at once by the pod's own loopback (curl: "Couldn't connect"), not a timeout.
    assert!(stderr.contains("Failed to connect"), "{stderr}");

    // The next agent replaces the stale rules (one jump, not two) and takes over.
    let restarted = Agent::start(&node, &[&client], IPTABLES).unwrap();
    assert_eq!(
        nat_table(&node, &client).matches("-j MESH_OUTPUT").count(),
        1
    );
    assert!(run(&node, &client, curl(&[&url])).ends_with("ok"));
    let record = &restarted
        .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
        .unwrap()[0];
    assert_eq!(record["original_dst"], server.addr(8080).to_string());
}

#[test]
fn without_iptables_restore_on_path_the_agent_refuses_with_a_clear_message() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let empty = std::env::temp_dir().join(format!("mesh-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let mut command = Command::new(mesh_tests::agent_binary().unwrap());
    command
        .args(["run", "--redirect", "iptables", "--admin", "127.0.0.1:0"])
        .arg("--enroll")
        .arg(format!("client={}", client.netns_path().display()))
        .env("PATH", &empty);
    let mut agent = node.spawn_on_node(command).unwrap();
    let status = agent.finish(TIMEOUT).unwrap();
    let stderr = agent.stderr().text();
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(!status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains("--redirect iptables needs `iptables-restore`")
            && stderr.contains("apt-get install iptables"),
        "{stderr}"
    );
    // Refused before enrolling anything.
    assert_eq!(mesh_rules(&node, &client), Vec::<String>::new());
}

#[test]
fn a_start_that_fails_halfway_leaves_no_rules_behind() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let mut command = Command::new(mesh_tests::agent_binary().unwrap());
    command
        .args(["run", "--redirect", "iptables", "--admin", "127.0.0.1:0"])
        .arg("--enroll")
        .arg(format!("client={}", client.netns_path().display()))
        .args(["--enroll", "ghost=/var/run/netns/mesh-no-such-netns"]);
    let mut agent = node.spawn_on_node(command).unwrap();
    let status = agent.finish(TIMEOUT).unwrap();
    let stderr = agent.stderr().text();
    assert!(!status.success(), "the agent started: {stderr}");
    assert!(stderr.contains("pod ghost"), "{stderr}");
    // The first pod was enrolled before the second failed; its rules went with the agent.
    assert_eq!(mesh_rules(&node, &client), Vec::<String>::new());
}
