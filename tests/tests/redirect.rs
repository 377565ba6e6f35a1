//! The kernel redirect path end to end on a simulated node: real eBPF programs attached to the
//! node's cgroup, real pods (network namespaces) and processes, the real agent.

use std::{
    collections::{BTreeMap, HashMap},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::probe::{curl, probe, start_server};
use mesh_tests::{
    agent::attached_programs, leftovers_of, require_root, Agent, Pod, PodProcess, SimNode,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A node with a `client` pod and a `server` pod answering `ok` on :8080.
fn client_and_ok_server() -> (SimNode, Pod, Pod, PodProcess) {
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    let process = start_server(
        &node,
        &server,
        &["http-server", "--listen", "0.0.0.0:8080", "--body", "ok"],
    );
    (node, client, server, process)
}

/// Runs a command to completion and returns its stdout; panics with its stderr on failure.
fn run(node: &SimNode, pod: Option<&Pod>, command: Command) -> String {
    let mut process = match pod {
        Some(pod) => node.spawn_in_pod(pod, command).unwrap(),
        None => node.spawn_on_node(command).unwrap(),
    };
    let status = process.finish(TIMEOUT).unwrap();
    assert!(
        status.success(),
        "{} failed: {}",
        process.label(),
        process.stderr().text()
    );
    process.stdout().text()
}

fn counts(agent: &Agent) -> BTreeMap<String, u64> {
    agent.decisions().unwrap()
}

#[test]
fn an_enrolled_pods_request_goes_through_the_agent_and_others_do_not() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let bystander = node.add_pod("bystander").unwrap();
    let server = node.add_pod("server").unwrap();
    let _server = start_server(
        &node,
        &server,
        &[
            "http-server",
            "--listen",
            "0.0.0.0:8080",
            "--body",
            "hello from server",
        ],
    );
    let agent = Agent::start(&node, &[&client], &[]).unwrap();
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
    assert_eq!(record["source_pod"], "client");
    assert_eq!(record["original_dst"], server.addr(8080).to_string());
    assert_eq!(record["error"], Value::Null);

    // Neither a pod that is not enrolled nor the node itself is redirected, and both work.
    assert!(run(&node, Some(&bystander), curl(&[&url])).ends_with("hello from server"));
    assert!(run(&node, None, curl(&[&url])).ends_with("hello from server"));

    let counts = counts(&agent);
    assert_eq!(counts["redirected"], 1, "{counts:?}");
    assert_eq!(counts["not_enrolled"], 2, "{counts:?}");
    // Exactly one upstream connection of the agent's own, and it was let through.
    assert_eq!(counts["agent_socket"], 1, "{counts:?}");
    assert_eq!(agent.access_log().len(), 1);
}

#[test]
fn many_pods_many_connections_are_intact_and_attributed_exactly() {
    require_root();
    const CONNS: usize = 200;
    const BYTES: usize = 1 << 20;
    let node = SimNode::new().unwrap();
    let clients: Vec<Pod> = (0..3)
        .map(|i| node.add_pod(&format!("client-{i}")).unwrap())
        .collect();
    let server = node.add_pod("server").unwrap();
    let _server = start_server(&node, &server, &["echo-server", "--listen", "0.0.0.0:7000"]);
    let agent = Agent::start(&node, &clients.iter().collect::<Vec<_>>(), &[]).unwrap();
    let to = server.addr(7000).to_string();

    let (conns, bytes) = (CONNS.to_string(), BYTES.to_string());
    let mut echoes: Vec<PodProcess> = clients
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let seed = i.to_string();
            let args = [
                "echo-client",
                "--to",
                &to,
                "--conns",
                &conns,
                "--bytes",
                &bytes,
                "--seed",
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
    assert!(
        sent.is_empty(),
        "connections the agent did not report: {sent:?}"
    );
    let counts = counts(&agent);
    assert_eq!(counts["redirected"], 3 * CONNS as u64, "{counts:?}");
    assert_eq!(counts["agent_socket"], 3 * CONNS as u64, "{counts:?}");
}

#[test]
fn a_killed_agent_fails_open_and_a_restarted_one_takes_over_again() {
    require_root();
    let (node, client, server, _server) = client_and_ok_server();
    let url = format!("http://{}/", server.addr(8080));
    let mut agent = Agent::start(&node, &[&client], &[]).unwrap();
    run(&node, Some(&client), curl(&[&url]));
    agent
        .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
        .unwrap();

    agent.process().signal(libc::SIGKILL).unwrap();
    let killed = Instant::now();
    agent.process().wait_timeout(TIMEOUT).unwrap();
    // New connections succeed directly, from the first try on.
    let mut direct = node
        .spawn_in_pod(&client, curl(&["--max-time", "1", &url]))
        .unwrap();
    assert!(
        direct.finish(TIMEOUT).unwrap().success(),
        "{}",
        direct.stderr().text()
    );
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "fail-open took {:?}",
        killed.elapsed()
    );
    assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);

    let restarted = Agent::start(&node, &[&client], &[]).unwrap();
    run(&node, Some(&client), curl(&[&url]));
    let record = &restarted
        .wait_for_records(1, |r| r["kind"] == "tcp", TIMEOUT)
        .unwrap()[0];
    assert_eq!(record["original_dst"], server.addr(8080).to_string());
    assert_eq!(counts(&restarted)["redirected"], 1);
}

/// The original-destination maps hold only connections still open: after 10,000 short
/// connections have closed, at most this many entries remain (connections whose close the
/// kernel has not finished yet). LRU capacity bounds them in any case.
const MAP_ENTRIES_AFTER_CLOSE: u64 = 16;

#[test]
fn original_destination_maps_stay_bounded_after_ten_thousand_connections() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    let _server = start_server(
        &node,
        &server,
        &["http-server", "--listen", "0.0.0.0:8080", "--body", "ok"],
    );
    let agent = Agent::start(&node, &[&client], &[]).unwrap();
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
    assert_eq!(counts(&agent)["redirected"], 10_000);

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

#[test]
fn a_clean_exit_detaches_everything_and_the_node_leaves_nothing_behind() {
    require_root();
    let node = SimNode::new().unwrap();
    let node_id = node.id();
    let client = node.add_pod("client").unwrap();
    let mut agent = Agent::start(&node, &[&client], &[]).unwrap();
    assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 3);
    let status = agent.process().stop(Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        agent.process().stderr().text()
    );
    assert!(agent
        .process()
        .stderr()
        .text()
        .contains("programs detached"));
    assert_eq!(attached_programs(node.cgroup_path()).unwrap(), 0);
    // The agent never pins: nothing of ours under a mounted bpffs.
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        let ours: Vec<_> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .to_lowercase()
                    .contains("mesh")
            })
            .collect();
        assert!(ours.is_empty(), "pinned: {ours:?}");
    }
    drop(agent);
    drop(node);
    assert_eq!(leftovers_of(&node_id), Vec::<String>::new());
}

#[test]
fn pods_are_enrolled_and_unenrolled_at_run_time() {
    require_root();
    let (node, client, server, _server) = client_and_ok_server();
    let url = format!("http://{}/", server.addr(8080));
    let agent = Agent::start(&node, &[], &[]).unwrap();

    let body = format!(
        r#"{{"name":"client","netns":"{}"}}"#,
        client.netns_path().display()
    );
    let (status, answer) = agent.admin_request("POST", "/pods", &body).unwrap();
    assert_eq!(status, 200, "{answer}");
    run(&node, Some(&client), curl(&[&url]));
    assert_eq!(counts(&agent)["redirected"], 1);

    let (status, answer) = agent.admin_request("DELETE", "/pods/client", "").unwrap();
    assert_eq!(status, 200, "{answer}");
    run(&node, Some(&client), curl(&[&url]));
    let counts = counts(&agent);
    assert_eq!(
        (counts["redirected"], counts["not_enrolled"]),
        (1, 1),
        "{counts:?}"
    );

    let (status, _) = agent.admin_request("DELETE", "/pods/client", "").unwrap();
    assert_eq!(status, 404);
}

/// `--socket-fast-path`: both ends of every redirected connection (the pod's socket and the
/// agent's in-pod socket) join the kernel's socket map, and keep-alive HTTP still works through
/// it; without the flag no socket joins. The client uses sockets with a timeout, which Python
/// drives non-blocking with poll, as event-loop clients do (see docs/performance.md for why a
/// blocking reader is not safe on this path yet).
#[test]
fn the_socket_fast_path_carries_both_ends_of_each_redirected_connection() {
    require_root();
    let (node, client, server, _server) = client_and_ok_server();
    let script = format!(
        r#"
import socket, sys, time
held = []
for _ in range(3):
    s = socket.create_connection(("{ip}", 8080), timeout=10)
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
        let flags: &[&str] = if fast_path {
            &["--socket-fast-path"]
        } else {
            &[]
        };
        let agent = Agent::start(&node, &[&client], flags).unwrap();
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
