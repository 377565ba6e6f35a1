//! The admin API locked down, as a hostile local user or pod neighbour would try it: changes
//! only through the root-only Unix socket, a network namespace path that is no network
//! namespace refused at once, a body limit, and in Kubernetes mode an address on the node that
//! answers probes and metrics only. Needs root (the agent, another uid).

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{require_root, Agent, SimNode};
use serde_json::Value;

/// A rule that would change routing for everyone: what a hostile user would apply.
const ABORT_418: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hijack, namespace: default}
spec:
  hosts: [service-b]
  http:
  - fault: {abort: {percentage: {value: 100}, httpStatus: 418}}
    route:
    - destination: {host: service-b}
";

/// How long a refusal may take: "at once".
const AT_ONCE: Duration = Duration::from_millis(100);

fn objects_in_force(agent: &Agent) -> Vec<String> {
    let (status, dump) = agent.admin_get("/config_dump").unwrap();
    assert_eq!(status, 200, "{dump}");
    let dump: Value = serde_json::from_str(&dump).unwrap();
    dump["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]).replace('"', ""))
        .collect()
}

#[test]
fn the_tcp_address_reads_and_refuses_every_change() {
    require_root();
    let node = SimNode::new().unwrap();
    let pod = node.add_pod("client").unwrap();
    let mut agent = Agent::start(&node, &[], &[]).unwrap();
    let socket = agent.admin_socket();
    let enroll = format!(
        r#"{{"name":"client","netns":"{}"}}"#,
        pod.netns_path().display()
    );
    for (method, path, body) in [
        ("POST", "/apply", ABORT_418),
        ("POST", "/delete", ABORT_418),
        ("POST", "/pods", enroll.as_str()),
        ("DELETE", "/pods/client", ""),
        ("PUT", "/logging?level=trace", ""),
        ("POST", "/logging?level=trace", ""),
    ] {
        let (status, answer) = agent.admin_tcp_request(method, path, body).unwrap();
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(
            answer.contains(&socket.display().to_string()),
            "the refusal says where changes go: {answer}"
        );
    }
    assert_eq!(objects_in_force(&agent), Vec::<String>::new());
    assert_eq!(agent.enrolled().unwrap(), Vec::<String>::new());
    for path in [
        "/healthz",
        "/ready",
        "/metrics",
        "/graph",
        "/graph.json",
        "/stats",
        "/pods",
        "/config_dump",
    ] {
        let (status, answer) = agent.admin_tcp_request("GET", path, "").unwrap();
        assert_eq!(status, 200, "GET {path} on TCP: {answer}");
    }

    // The same changes through the socket, as root, take effect.
    let (status, answer) = agent.admin_request("POST", "/apply", ABORT_418).unwrap();
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = agent.admin_request("POST", "/pods", &enroll).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(objects_in_force(&agent), ["VirtualService/hijack"]);
    assert_eq!(agent.enrolled().unwrap(), ["default/client"]);

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is root's only");
    let status = agent.process().stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", agent.stderr_text());
    assert!(!socket.exists(), "a clean exit removes the socket");
}

#[test]
fn a_user_other_than_root_changes_nothing() {
    require_root();
    let node = SimNode::new().unwrap();
    let agent = Agent::start(&node, &[], &[]).unwrap();
    // Where uid 65534 can read the rule and run the CLI: a checkout may sit in a directory only
    // root can enter (`mktemp -d` makes them 0700).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = dir.path().join("mesh-agent");
    std::fs::copy(mesh_tests::agent_binary().unwrap(), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rule = dir.path().join("hijack.yml");
    std::fs::write(&rule, ABORT_418).unwrap();
    std::fs::set_permissions(&rule, std::fs::Permissions::from_mode(0o644)).unwrap();
    let apply = |uid: Option<u32>| {
        let mut command = Command::new(&cli);
        command
            .arg("apply")
            .arg("--admin-socket")
            .arg(agent.admin_socket())
            .arg("-f")
            .arg(&rule);
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        mesh_tests::command::retry_while_text_busy(|| command.output()).unwrap()
    };

    let output = apply(Some(65534));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "uid 65534 applied: {stderr}");
    assert!(
        stderr.contains("Permission denied") && stderr.contains("need root"),
        "{stderr}"
    );
    assert_eq!(objects_in_force(&agent), Vec::<String>::new());

    let output = apply(None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "VirtualService default/hijack configured\n"
    );
}

#[test]
fn a_netns_path_that_is_no_network_namespace_is_refused_at_once() {
    require_root();
    let node = SimNode::new().unwrap();
    let agent = Agent::start(&node, &[], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("netns");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    for (path, reason) in [
        (fifo.as_path(), "not a network namespace: a FIFO"),
        (
            Path::new("/proc/self/ns/mnt"),
            "not a network namespace: a mount namespace",
        ),
        (
            Path::new("/dev/null"),
            "not a network namespace: a character device",
        ),
    ] {
        let body = format!(r#"{{"name":"hostile","netns":"{}"}}"#, path.display());
        let started = Instant::now();
        let (status, answer) = agent.admin_request("POST", "/pods", &body).unwrap();
        let took = started.elapsed();
        assert_eq!(status, 400, "{}: {answer}", path.display());
        assert!(
            answer.contains(&path.display().to_string()) && answer.contains(reason),
            "{answer}"
        );
        assert!(took < AT_ONCE, "{}: refused after {took:?}", path.display());
        let started = Instant::now();
        let (status, _) = agent.admin_get("/healthz").unwrap();
        let healthz = started.elapsed();
        assert_eq!(status, 200);
        assert!(healthz < AT_ONCE, "{healthz:?}");
        eprintln!(
            "{}: refused in {took:?}, /healthz then in {healthz:?}",
            path.display()
        );
    }
    assert_eq!(agent.enrolled().unwrap(), Vec::<String>::new());
}

#[test]
fn a_body_over_the_limit_gets_413() {
    require_root();
    let node = SimNode::new().unwrap();
    let agent = Agent::start(&node, &[], &[]).unwrap();
    let mut stream = UnixStream::connect(agent.admin_socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // 64 MiB announced: answered from the head, before a byte of it is read.
    let head = format!(
        "POST /apply HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n\r\n",
        64 << 20
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("4194304 bytes"), "{answer}");
}

/// The agent in Kubernetes mode whose API server never answers: it starts, serves its admin API
/// and waits for the first lists, which is all this needs.
fn kubernetes_agent(node: &SimNode, dir: &Path) -> Agent {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: 'https://127.0.0.1:9', insecure-skip-tls-verify: true}
users:
- name: nobody
  user: {token: none}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: nobody}
current-context: nowhere
",
    )
    .unwrap();
    let agent = Agent::spawn_kubernetes(node, &kubeconfig, "node-1").unwrap();
    mesh_tests::wait_for("the admin API", Duration::from_secs(20), || {
        Ok(matches!(agent.admin_tcp_request("GET", "/healthz", ""), Ok((200, _))).then_some(()))
    })
    .unwrap();
    agent
}

#[test]
fn kubernetes_mode_serves_probes_on_the_node_address_and_takes_no_changes() {
    require_root();
    let node = SimNode::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = kubernetes_agent(&node, dir.path());
    for (path, expected) in [
        ("/healthz", 200),
        ("/ready", 503),
        ("/metrics", 200),
        ("/graph", 200),
        ("/graph.json", 200),
    ] {
        let (status, answer) = agent.admin_tcp_request("GET", path, "").unwrap();
        assert_eq!(status, expected, "GET {path} on the node address: {answer}");
    }
    for path in ["/config_dump", "/stats", "/pods", "/clusters"] {
        let (status, answer) = agent.admin_tcp_request("GET", path, "").unwrap();
        assert_eq!(status, 403, "GET {path} on the node address: {answer}");
        let (status, answer) = agent.admin_get(path).unwrap();
        assert_eq!(status, 200, "GET {path} on the socket: {answer}");
    }
    for (method, path, body) in [
        ("PUT", "/logging?level=trace", ""),
        ("POST", "/logging?level=trace", ""),
        ("POST", "/apply", ABORT_418),
        ("POST", "/pods", r#"{"name":"x","netns":"/proc/1/ns/net"}"#),
        ("DELETE", "/pods/default/x", ""),
    ] {
        let (status, answer) = agent.admin_tcp_request(method, path, body).unwrap();
        assert_eq!(status, 403, "{method} {path} on the node address: {answer}");
        let (status, answer) = agent.admin_request(method, path, body).unwrap();
        assert_eq!(status, 403, "{method} {path} on the socket: {answer}");
        assert!(answer.contains("read-only in Kubernetes mode"), "{answer}");
    }
    assert!(
        !agent.stderr_text().contains("TRACE"),
        "the log level changed"
    );
}
