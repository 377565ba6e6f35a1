//! The node proxy end to end, where only the real thing will do: connections from a pod through
//! the kernel redirect to the agent process, config changes under load (`apply` and the watched
//! folder), and SIGTERM's drain. How the proxy routes, retries, reports and refuses requests is
//! tested in process, without root: `mesh-agent/tests/proxy_*.rs`.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use mesh_tests::{require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(120);
const SERVICE_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

fn upstream(args: &[&str]) -> Command {
    let mut command = Command::new(UPSTREAM);
    command.args(args);
    command
}

fn serve(node: &SimNode, pod: &Pod, name: &str) -> PodProcess {
    let args = ["serve", "--listen", "0.0.0.0:8080", "--name", name];
    let server = node.spawn_in_pod(pod, upstream(&args)).unwrap();
    server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
        .unwrap();
    server
}

/// Runs `upstream get|grpc ...` in `pod` and returns its summary line.
fn client(node: &SimNode, pod: &Pod, args: &[&str]) -> Value {
    let mut process = node.spawn_in_pod(pod, upstream(args)).unwrap();
    let status = process.finish(TIMEOUT).unwrap();
    assert!(status.success(), "{}", process.stderr().text());
    let lines = process.stdout().json_lines();
    lines
        .into_iter()
        .rfind(|l| l["summary"] == true)
        .expect("the client printed no summary")
}

fn count(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

/// A node with a client pod and two `service-c` pods (v1, v2), both subsets defined.
struct Mesh {
    node: SimNode,
    client: Pod,
    /// Kept alive with the node: service-c v1 and v2.
    _backends: [Pod; 2],
    config: ConfigDir,
    _servers: Vec<PodProcess>,
}

fn mesh() -> Mesh {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let c_v1 = node.add_pod("service-c-v1-0").unwrap();
    let c_v2 = node.add_pod("service-c-v2-0").unwrap();
    node.add_host("service-c", SERVICE_C).unwrap();
    let servers = vec![serve(&node, &c_v1, "v1"), serve(&node, &c_v2, "v2")];
    let config = ConfigDir::new().unwrap();
    config
        .service(
            "service-c",
            SERVICE_C,
            8080,
            "http",
            &[
                Backend {
                    pod: &c_v1,
                    labels: &[("app", "service-c"), ("version", "v1")],
                },
                Backend {
                    pod: &c_v2,
                    labels: &[("app", "service-c"), ("version", "v2")],
                },
            ],
        )
        .unwrap();
    config
        .copy_example("destination-rules.yml", "destination-rules.yml")
        .unwrap();
    Mesh {
        node,
        client,
        _backends: [c_v1, c_v2],
        config,
        _servers: servers,
    }
}

impl Mesh {
    /// `count` GETs of `http://service-c:8080/` from the client pod; the client's summary.
    fn get(&self, count: usize, extra: &[&str]) -> Value {
        let count = count.to_string();
        let mut args = vec!["get", "--url", "http://service-c:8080/", "--count", &count];
        args.extend(extra);
        client(&self.node, &self.client, &args)
    }

    fn agent(&self) -> Agent {
        let config = self.config.path().to_str().unwrap().to_owned();
        Agent::start(&self.node, &[&self.client], &["--config", &config]).unwrap()
    }
}

/// `mesh-agent apply -f file` on the node, through `agent`'s admin socket.
fn apply(node: &SimNode, agent: &Agent, file: &std::path::Path) -> (bool, String) {
    let mut command = Command::new(mesh_tests::agent_binary().unwrap());
    command
        .arg("apply")
        .arg("--admin-socket")
        .arg(agent.admin_socket())
        .arg("-f")
        .arg(file);
    let mut process = node.spawn_on_node(command).unwrap();
    let status = process.finish(TIMEOUT).unwrap();
    (
        status.success(),
        format!("{}{}", process.stdout().text(), process.stderr().text()),
    )
}

fn example(path: &str) -> std::path::PathBuf {
    mesh_tests::mesh_config::examples_dir().join(path)
}

#[test]
fn tcp_to_a_service_goes_through_the_real_redirect_and_the_agent_as_l4() {
    let mesh = mesh();
    // A raw TCP echo service on a port that declares no protocol: detected as not HTTP.
    let echo_pod = mesh.node.add_pod("echo-0").unwrap();
    let echo_vip = Ipv4Addr::new(10, 96, 0, 40);
    mesh.node.add_host("echo", echo_vip).unwrap();
    let probe = env!("CARGO_BIN_EXE_probe");
    let echo_server = mesh
        .node
        .spawn_in_pod(&echo_pod, {
            let mut c = Command::new(probe);
            c.args(["echo-server", "--listen", "0.0.0.0:7000"]);
            c
        })
        .unwrap();
    echo_server
        .stdout()
        .wait_for_json(|l| l["listening"].is_string(), TIMEOUT)
        .unwrap();
    mesh.config
        .service(
            "echo",
            echo_vip,
            7000,
            "echo",
            &[Backend {
                pod: &echo_pod,
                labels: &[("app", "echo")],
            }],
        )
        .unwrap();
    let agent = mesh.agent();

    let mut echo = mesh
        .node
        .spawn_in_pod(&mesh.client, {
            let mut c = Command::new(probe);
            c.args([
                "echo-client",
                "--to",
                &format!("{echo_vip}:7000"),
                "--conns",
                "5",
                "--bytes",
                "100000",
            ]);
            c
        })
        .unwrap();
    assert!(
        echo.finish(TIMEOUT).unwrap().success(),
        "{}",
        echo.stderr().text()
    );
    let lines = echo.stdout().json_lines();
    assert_eq!(lines.last().unwrap()["ok"], 5, "{lines:?}");
    for line in &lines[..5] {
        assert_eq!(line["sent_sha256"], line["recv_sha256"]);
    }
    let tcp = agent
        .access_log()
        .into_iter()
        .filter(|r| r["kind"] == "tcp")
        .count();
    assert_eq!(tcp, 5, "the echo connections went through the agent as L4");
    let stats = agent.stats().unwrap();
    assert!(
        stats["decisions"]["redirected"].as_u64().unwrap() >= 5,
        "{stats}"
    );
}

#[test]
fn canary_steps_applied_under_load_fail_no_request_and_a_bad_file_changes_nothing() {
    let mesh = mesh();
    let agent = mesh.agent();
    let mut load = mesh
        .node
        .spawn_in_pod(
            &mesh.client,
            upstream(&[
                "get",
                "--url",
                "http://service-c:8080/",
                "--count",
                "1600",
                "--rate",
                "200",
                "--concurrency",
                "4",
                "--quiet",
            ]),
        )
        .unwrap();
    let bad = mesh.config.path().join("bad.yml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(example("canary/2-vs-v1_and_v2_90_10.yml"))
            .unwrap()
            .replace("weight: 10", "weight: 20"),
    )
    .unwrap();
    for step in [
        "canary/1-vs-v1.yml",
        "canary/2-vs-v1_and_v2_90_10.yml",
        "canary/3-vs-v1_and_v2_50_50.yml",
    ] {
        std::thread::sleep(Duration::from_secs(1));
        let (ok, out) = apply(&mesh.node, &agent, &example(step));
        assert!(ok, "{step}: {out}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let (ok, out) = apply(&mesh.node, &agent, &bad);
    assert!(!ok);
    assert!(out.contains("bad.yml: VirtualService default/service-c: spec.http[0].route: weights sum to 110, must be 100"), "{out}");
    let (ok, out) = apply(&mesh.node, &agent, &example("canary/4-vs-v2.yml"));
    assert!(ok, "{out}");
    assert!(load.finish(TIMEOUT).unwrap().success());
    let summary = load.stdout().json_lines().pop().unwrap();
    println!("canary under load: {summary}");
    assert_eq!(count(&summary, "by_status", "200"), 1600, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");

    // After step 4 everything goes to v2.
    let after = mesh.get(100, &["--quiet"]);
    assert_eq!(count(&after, "by_body", "v2"), 100, "{after}");
}

#[test]
fn sigterm_lets_fifty_slow_requests_finish_then_the_agent_exits() {
    let mesh = mesh();
    mesh.config
        .copy_example("canary/1-vs-v1.yml", "vs.yml")
        .unwrap();
    let config = mesh.config.path().to_str().unwrap().to_owned();
    let mut agent = Agent::start(
        &mesh.node,
        &[&mesh.client],
        &["--config", &config, "--drain-seconds", "20"],
    )
    .unwrap();
    let mut load = mesh
        .node
        .spawn_in_pod(
            &mesh.client,
            upstream(&[
                "get",
                "--url",
                "http://service-c:8080/delay/2000",
                "--count",
                "50",
                "--concurrency",
                "50",
                "--quiet",
                "--timeout-secs",
                "30",
            ]),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    agent.process().signal(libc::SIGTERM).unwrap();
    assert!(load.finish(TIMEOUT).unwrap().success());
    let summary = load.stdout().json_lines().pop().unwrap();
    assert_eq!(count(&summary, "by_status", "200"), 50, "{summary}");
    let status = agent.process().finish(TIMEOUT).unwrap();
    assert!(status.success(), "{status}");
    assert!(agent
        .process()
        .stderr()
        .text()
        .contains("programs detached"));
}

#[test]
fn a_folder_change_applies_within_a_second_and_a_bad_one_is_rejected() {
    let mesh = mesh();
    mesh.config
        .copy_example("canary/1-vs-v1.yml", "vs.yml")
        .unwrap();
    let agent = mesh.agent();
    let get = [
        "get",
        "--url",
        "http://service-c:8080/",
        "--count",
        "20",
        "--quiet",
    ];
    assert_eq!(
        count(&client(&mesh.node, &mesh.client, &get), "by_body", "v1"),
        20
    );

    mesh.config
        .copy_example("canary/4-vs-v2.yml", "vs.yml")
        .unwrap();
    let changed = std::time::Instant::now();
    let deadline = changed + Duration::from_secs(1);
    loop {
        let summary = client(
            &mesh.node,
            &mesh.client,
            &["get", "--url", "http://service-c:8080/", "--quiet"],
        );
        if count(&summary, "by_body", "v2") == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change did not apply within 1 s"
        );
    }
    println!("folder change applied after {:?}", changed.elapsed());

    // A bad edit: rejected with file, object, field and reason; the last good version (v2)
    // stays in force, and /config_dump says so.
    let bad =
        std::fs::read_to_string(mesh_tests::mesh_config::examples_dir().join("canary/4-vs-v2.yml"))
            .unwrap()
            .replace("weight: 100", "weight: 50");
    mesh.config.write("vs.yml", &bad).unwrap();
    let rejection = "rejected, the last good version stays in force: ";
    mesh_tests::wait_for("the bad edit rejected", TIMEOUT, || {
        Ok(agent.stderr_text().contains(rejection).then_some(()))
    })
    .unwrap();
    assert_eq!(
        count(&client(&mesh.node, &mesh.client, &get), "by_body", "v2"),
        20
    );
    let stderr = agent.stderr_text();
    assert!(
        stderr.contains(&format!(
            "{rejection}{}: VirtualService default/service-c: spec.http[0].route: weights sum \
             to 50, must be 100",
            mesh.config.path().join("vs.yml").display()
        )),
        "{stderr}"
    );
    let (_, dump) = agent.admin_get("/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    let rejected = &dump["rejected"][0];
    assert_eq!(
        (&rejected["name"], &rejected["outcome"]),
        (
            &Value::from("service-c"),
            &Value::from("last_good_in_force")
        ),
        "{dump}"
    );
}
