//! The node proxy end to end: pods call services by name, the agent routes every HTTP request
//! by the mesh's rules (local config folder) to real endpoint pods.

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

fn serve(node: &SimNode, pod: &Pod, name: &str, extra: &[&str]) -> PodProcess {
    let mut args = vec!["serve", "--listen", "0.0.0.0:8080", "--name", name];
    args.extend(extra);
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
    c_v1: Pod,
    c_v2: Pod,
    config: ConfigDir,
    _servers: Vec<PodProcess>,
}

fn mesh(v2_args: &[&str]) -> Mesh {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let c_v1 = node.add_pod("service-c-v1-0").unwrap();
    let c_v2 = node.add_pod("service-c-v2-0").unwrap();
    node.add_host("service-c", SERVICE_C).unwrap();
    let servers = vec![
        serve(&node, &c_v1, "v1", &[]),
        serve(&node, &c_v2, "v2", v2_args),
    ];
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
        c_v1,
        c_v2,
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

#[test]
fn a_ninety_ten_split_holds_over_keep_alive_connections() {
    let mesh = mesh(&[]);
    mesh.config
        .copy_example("canary/2-vs-v1_and_v2_90_10.yml", "vs.yml")
        .unwrap();
    let _agent = mesh.agent();
    let summary = mesh.get(1000, &["--concurrency", "4", "--quiet"]);
    let (v1, v2) = (
        count(&summary, "by_body", "v1"),
        count(&summary, "by_body", "v2"),
    );
    println!("90/10 over 1000 requests: v1={v1} v2={v2}");
    assert_eq!(v1 + v2, 1000, "{summary}");
    assert!((880..=920).contains(&v1), "{summary}");
    let _ = (&mesh.c_v1, &mesh.c_v2);
}

fn apply(node: &SimNode, file: &std::path::Path) -> (bool, String) {
    let mut command = Command::new(mesh_tests::agent_binary().unwrap());
    command.arg("apply").arg("-f").arg(file);
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
fn one_failing_endpoint_fails_half_the_requests_until_outlier_detection_and_retries() {
    let mesh = mesh(&["--fail-status", "500"]);
    let agent = mesh.agent();
    let get = [
        "get",
        "--url",
        "http://service-c:8080/",
        "--count",
        "400",
        "--quiet",
    ];
    let before = client(&mesh.node, &mesh.client, &get);
    let failed = count(&before, "by_status", "500");
    println!("no policy: {failed} of 400 failed");
    assert!((120..=280).contains(&failed), "{before}");

    for step in [
        "circuit-breaker/2-destination-rules.yml",
        "circuit-breaker/3-vs-retry.yml",
    ] {
        let (ok, out) = apply(&mesh.node, &example(step));
        assert!(ok, "{step}: {out}");
    }
    let get = [
        "get",
        "--url",
        "http://service-c:8080/",
        "--count",
        "1000",
        "--quiet",
    ];
    let after = client(&mesh.node, &mesh.client, &get);
    println!("outlier detection + retries: {after}");
    assert_eq!(count(&after, "by_status", "200"), 1000, "{after}");
    let stats = agent.stats().unwrap();
    assert!(stats["decisions"]["redirected"].as_u64().unwrap() >= 2);
    // The admin API shows the failing endpoint ejected.
    let (_, clusters) = agent.admin_get("/clusters").unwrap();
    let clusters: Value = serde_json::from_str(&clusters).unwrap();
    let ejected: Vec<&Value> = clusters
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["endpoints"].as_array().unwrap())
        .filter(|e| !e["ejected_for"].is_null())
        .collect();
    assert_eq!(ejected.len(), 1, "{clusters}");
    assert_eq!(
        ejected[0]["address"],
        mesh.c_v2.addr(8080).to_string(),
        "{clusters}"
    );
}

#[test]
fn http2_and_grpc_are_routed_and_other_tcp_passes_through() {
    let mesh = mesh(&[]);
    mesh.config
        .copy_example("canary/4-vs-v2.yml", "vs.yml")
        .unwrap();
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

    let h2 = mesh.get(50, &["--h2", "--quiet"]);
    assert_eq!(count(&h2, "by_body", "v2"), 50, "{h2}");
    let grpc = client(
        &mesh.node,
        &mesh.client,
        &[
            "grpc",
            "--url",
            "http://service-c:8080/demo.Echo/Say",
            "--count",
            "50",
            "--quiet",
        ],
    );
    assert_eq!(count(&grpc, "by_grpc_status", "0"), 50, "{grpc}");
    assert_eq!(count(&grpc, "by_body", "v2"), 50, "{grpc}");

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
}

#[test]
fn canary_steps_applied_under_load_fail_no_request_and_a_bad_file_changes_nothing() {
    let mesh = mesh(&[]);
    let _agent = mesh.agent();
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
        let (ok, out) = apply(&mesh.node, &example(step));
        assert!(ok, "{step}: {out}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let (ok, out) = apply(&mesh.node, &bad);
    assert!(!ok);
    assert!(out.contains("bad.yml: VirtualService default/service-c: spec.http[0].route: weights sum to 110, must be 100"), "{out}");
    let (ok, out) = apply(&mesh.node, &example("canary/4-vs-v2.yml"));
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

/// Sends raw bytes from the client pod with bash's /dev/tcp and returns what came back.
fn raw_exchange(mesh: &Mesh, request: &str) -> String {
    let script =
        format!("exec 3<>/dev/tcp/service-c/8080; printf '{request}' >&3; timeout 5 cat <&3");
    let mut command = Command::new("bash");
    command.args(["-c", &script]);
    let mut process = mesh.node.spawn_in_pod(&mesh.client, command).unwrap();
    process.finish(TIMEOUT).unwrap();
    format!("{}{}", process.stdout().text(), process.stderr().text())
}

#[test]
fn smuggling_attempts_get_400_or_431_and_reach_no_upstream() {
    let mesh = mesh(&[]);
    mesh.config
        .copy_example("canary/1-vs-v1.yml", "vs.yml")
        .unwrap();
    let _agent = mesh.agent();
    let both = raw_exchange(
        &mesh,
        "POST / HTTP/1.1\\r\\nHost: service-c\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n",
    );
    assert!(both.starts_with("HTTP/1.1 400"), "{both}");
    let lengths = raw_exchange(
        &mesh,
        "POST / HTTP/1.1\\r\\nHost: service-c\\r\\nContent-Length: 5\\r\\nContent-Length: 6\\r\\n\\r\\nhello!",
    );
    assert!(lengths.starts_with("HTTP/1.1 400"), "{lengths}");
    let big = "a".repeat(70 * 1024);
    let too_large = client(
        &mesh.node,
        &mesh.client,
        &[
            "get",
            "--url",
            "http://service-c:8080/",
            "--header",
            &format!("x-big: {big}"),
        ],
    );
    assert_eq!(count(&too_large, "by_status", "431"), 1, "{too_large}");
    // The upstream has served nothing before this request.
    let mut check = mesh
        .node
        .spawn_in_pod(
            &mesh.client,
            upstream(&["get", "--url", "http://service-c:8080/"]),
        )
        .unwrap();
    check.finish(TIMEOUT).unwrap();
    let response = &check.stdout().json_lines()[0];
    assert_eq!(response["headers"]["x-request-count"], "1", "{response}");
}

#[test]
fn metrics_count_requests_per_version_and_code_in_prometheus_format() {
    let mesh = mesh(&[]);
    mesh.config
        .copy_example("canary/2-vs-v1_and_v2_90_10.yml", "vs.yml")
        .unwrap();
    let agent = mesh.agent();
    let summary = mesh.get(100, &["--quiet"]);
    assert_eq!(count(&summary, "by_status", "200"), 100, "{summary}");
    let (status, text) = agent.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let requests = |version: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "istio_requests_total")
            .filter(|s| s.labels.get("destination_version") == Some(version))
            .filter(|s| s.labels.get("response_code") == Some("200"))
            .filter(|s| {
                s.labels.get("destination_service") == Some("service-c.default.svc.cluster.local")
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    // Exact: the split is smooth weighted round-robin.
    assert_eq!((requests("v1"), requests("v2")), (90.0, 10.0), "{text}");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric.starts_with("mesh_redirect_decisions")
                && s.labels.get("decision") == Some("redirected")),
        "{text}"
    );
}

#[test]
fn b3_context_continues_upstream_and_spans_are_exported_with_the_parent() {
    use std::io::{Read, Write};
    let mesh = mesh(&[]);
    mesh.config
        .copy_example("canary/1-vs-v1.yml", "vs.yml")
        .unwrap();
    // A collector on the node: answers 200 and hands over each export's body.
    let (bodies, received) = std::sync::mpsc::channel::<Vec<u8>>();
    let listener = mesh
        .node
        .run_on_node(|| std::net::TcpListener::bind("127.0.0.1:4318").unwrap())
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut data = Vec::new();
            let mut buf = [0u8; 65536];
            // Read the head, then Content-Length bytes.
            let (head_end, length) = loop {
                let n = stream.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break (None, 0);
                }
                data.extend_from_slice(&buf[..n]);
                if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    break (Some(end + 4), length);
                }
            };
            let Some(start) = head_end else { continue };
            while data.len() < start + length {
                let n = stream.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            let _ = bodies.send(data[start..].to_vec());
        }
    });
    let config = mesh.config.path().to_str().unwrap().to_owned();
    let _agent = Agent::start(
        &mesh.node,
        &[&mesh.client],
        &[
            "--config",
            &config,
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
        ],
    )
    .unwrap();

    let trace_id = "463ac35c9f6413ad48485a3953bb6124";
    let span_id = "a2fb4a1d1a96d312";
    let mut process = mesh
        .node
        .spawn_in_pod(
            &mesh.client,
            upstream(&[
                "get",
                "--url",
                "http://service-c:8080/headers",
                "--header",
                &format!("x-b3-traceid: {trace_id}"),
                "--header",
                &format!("x-b3-spanid: {span_id}"),
                "--header",
                "x-b3-sampled: 1",
                "--header",
                "x-request-id: req-42",
            ]),
        )
        .unwrap();
    process.finish(TIMEOUT).unwrap();
    let response = &process.stdout().json_lines()[0];
    let seen: Value = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["x-b3-traceid"], trace_id, "{seen}");
    assert_eq!(seen["x-b3-parentspanid"], span_id, "{seen}");
    assert_eq!(seen["x-request-id"], "req-42", "{seen}");
    let our_span = seen["x-b3-spanid"].as_str().unwrap().to_owned();
    assert_ne!(our_span, span_id);
    assert!(
        seen["traceparent"].as_str().unwrap().contains(trace_id),
        "{seen}"
    );

    // The exported span: same trace id, our span id, the caller's span as parent (raw bytes in
    // the protobuf body).
    let body = received
        .recv_timeout(Duration::from_secs(15))
        .expect("no span export");
    let bytes = |hex: &str| -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    };
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(contains(&bytes(trace_id)), "trace id not in the export");
    assert!(contains(&bytes(&our_span)), "span id not in the export");
    assert!(
        contains(&bytes(span_id)),
        "parent span id not in the export"
    );
    assert!(
        contains(b"service-c.default.svc.cluster.local:8080/*"),
        "span name"
    );
}

#[test]
fn sigterm_lets_fifty_slow_requests_finish_then_the_agent_exits() {
    let mesh = mesh(&[]);
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
    let mesh = mesh(&[]);
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

    // A bad edit: rejected with file, object, field and reason; v2 keeps serving.
    let bad =
        std::fs::read_to_string(mesh_tests::mesh_config::examples_dir().join("canary/4-vs-v2.yml"))
            .unwrap()
            .replace("weight: 100", "weight: 50");
    mesh.config.write("vs.yml", &bad).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&client(&mesh.node, &mesh.client, &get), "by_body", "v2"),
        20
    );
    let stderr = agent.stderr_text();
    assert!(
        stderr.contains("vs.yml: VirtualService default/service-c: spec.http[0].route: weights sum to 50, must be 100"),
        "{stderr}"
    );
    let (_, dump) = agent.admin_get("/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert!(dump["reloads"]["rejected"].as_u64().unwrap() >= 1, "{dump}");
}

#[test]
fn the_ingress_gateway_routes_by_gateway_bound_rules_with_rewrite() {
    require_root();
    let node = SimNode::new().unwrap();
    let a = node.add_pod("service-a-0").unwrap();
    let _server = serve(&node, &a, "a", &[]);
    let config = ConfigDir::new().unwrap();
    config
        .service(
            "service-a",
            Ipv4Addr::new(10, 96, 0, 10),
            8080,
            "http",
            &[Backend {
                pod: &a,
                labels: &[("app", "service-a")],
            }],
        )
        .unwrap();
    config.copy_example("gateway.yml", "gateway.yml").unwrap();
    let dir = config.path().to_str().unwrap().to_owned();
    let _agent = Agent::start(
        &node,
        &[],
        &["--config", &dir, "--ingress", "127.0.0.1:8081"],
    )
    .unwrap();

    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--noproxy",
        "*",
        "http://127.0.0.1:8081/service-a/headers",
    ]);
    let mut process = node.spawn_on_node(curl).unwrap();
    assert!(
        process.finish(TIMEOUT).unwrap().success(),
        "{}",
        process.stderr().text()
    );
    let seen: Value = serde_json::from_str(&process.stdout().text()).unwrap();
    assert_eq!(seen[":path"], "/headers", "{seen}");

    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:8081/other",
    ]);
    let mut process = node.spawn_on_node(curl).unwrap();
    process.finish(TIMEOUT).unwrap();
    assert_eq!(
        process.stdout().text(),
        "404",
        "no gateway route for /other"
    );
}
