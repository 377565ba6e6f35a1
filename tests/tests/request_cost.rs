//! What one proxied HTTP/1.1 keep-alive request costs the agent in user space: instructions
//! and heap allocations, counted exactly by callgrind (whatever else the machine is doing), on
//! the bench's mesh path (`cargo xtask bench`'s `mesh-l7`: a 90/10 VirtualService with retries,
//! a DestinationRule with a pool and outlier detection, one worker).
//!
//! Not part of the normal run (`#[ignore]`): it needs valgrind and takes about a minute. As root:
//!
//! ```sh
//! cargo build --release -p mesh-agent && cargo build -p mesh-tests --bins
//! MESH_AGENT_BIN=$PWD/target/release/mesh-agent \
//!   cargo test -p mesh-tests --test request_cost -- --ignored --nocapture
//! ```
//!
//! It prints instructions (Ir) and allocations per request over `MESH_COST_REQUESTS` (default
//! 20,000) requests sent after a warm-up, on 16 keep-alive connections, and keeps the callgrind
//! profile of exactly those requests for `callgrind_annotate --inclusive=yes FILE`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_tests::{agent, require_root, Backend, ConfigDir, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const CONNECTIONS: &str = "16";
const WARM_UP: &str = "2000";

/// Allocation entry points of libc's allocator and of mimalloc's (as its `GlobalAlloc` calls
/// them), counted when called from outside the allocator.
const ALLOCATING: [&str; 7] = [
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
];

#[test]
#[ignore = "needs valgrind and a release agent in MESH_AGENT_BIN; see the module docs"]
fn instructions_and_allocations_per_request() {
    require_root();
    let requests: u64 = std::env::var("MESH_COST_REQUESTS")
        .ok()
        .map_or(20_000, |n| n.parse().expect("MESH_COST_REQUESTS"));
    let agent_bin = mesh_tests::agent_binary().unwrap();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("request-cost");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let profile = out_dir.join("callgrind.out");

    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let v1 = node.add_pod("hello-v1").unwrap();
    let v2 = node.add_pod("hello-v2").unwrap();
    node.add_host("hello", VIP).unwrap();
    let _servers = [serve(&node, &v1, "v1"), serve(&node, &v2, "v2")];
    let config = ConfigDir::new().unwrap();
    config
        .service(
            "hello",
            VIP,
            8080,
            "http",
            &[
                Backend {
                    pod: &v1,
                    labels: &[("app", "hello"), ("version", "v1")],
                },
                Backend {
                    pod: &v2,
                    labels: &[("app", "hello"), ("version", "v2")],
                },
            ],
        )
        .unwrap();
    config.write("rules.yml", RULES).unwrap();

    let mut command = Command::new("valgrind");
    command
        .args(["--tool=callgrind", "--dump-instr=no"])
        .arg(format!("--callgrind-out-file={}", profile.display()))
        .arg(&agent_bin)
        .arg("run")
        .arg("--cgroup")
        .arg(node.cgroup_path())
        .args(["--admin", agent::ADMIN, "--workers", "1"])
        .arg("--enroll")
        .arg(format!(
            "{}={}",
            client.name(),
            client.netns_path().display()
        ))
        .arg("--config")
        .arg(config.path());
    let mut agent = node.spawn_on_node(command).unwrap();
    wait_ready(&node, &agent);

    let warm_up = get(&node, &client, WARM_UP);
    assert_eq!(warm_up["errors"], 0, "{warm_up}");
    callgrind_control(&["-z"], agent.pid());
    let started = Instant::now();
    let run = get(&node, &client, &requests.to_string());
    let elapsed = started.elapsed();
    callgrind_control(&["-d"], agent.pid());
    assert_eq!(run["errors"], 0, "{run}");
    assert_eq!(run["by_status"]["200"], requests, "{run}");
    let by_body = &run["by_body"];
    let v2_share = by_body["v2"].as_f64().unwrap_or(0.0) / requests as f64;
    assert!((0.05..=0.15).contains(&v2_share), "not split 90/10: {run}");
    agent.stop(Duration::from_secs(60)).unwrap();

    let dump = dump_file(&out_dir);
    let (instructions, calls) = read_profile(&dump);
    let per_request = |n: u64| n as f64 / requests as f64;
    println!(
        "{requests} requests in {:.1} s under callgrind; profile: {}",
        elapsed.as_secs_f64(),
        dump.display()
    );
    println!("Ir per request: {:.0}", per_request(instructions));
    let allocations: u64 = ALLOCATING.iter().filter_map(|f| calls.get(*f)).sum();
    println!("allocations per request: {:.2}", per_request(allocations));
    for function in ALLOCATING {
        if let Some(n) = calls.get(function) {
            println!("  {function}: {:.2}", per_request(*n));
        }
    }
    for function in ["free", "mi_free"] {
        if let Some(n) = calls.get(function) {
            println!("  {function}: {:.2}", per_request(*n));
        }
    }
}

/// The bench's rules for `hello` (xtask/src/bench/proxies.rs).
const RULES: &str = "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: hello, namespace: default}
spec:
  hosts: [hello]
  http:
  - route:
    - destination: {host: hello, subset: v1}
      weight: 90
    - destination: {host: hello, subset: v2}
      weight: 10
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: 5xx}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: hello, namespace: default}
spec:
  host: hello
  trafficPolicy:
    connectionPool:
      http: {http1MaxPendingRequests: 1024, maxRequestsPerConnection: 0}
    outlierDetection: {consecutive5xxErrors: 5, interval: 2s, baseEjectionTime: 10s, maxEjectionPercent: 50}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

fn serve(node: &SimNode, pod: &Pod, name: &str) -> PodProcess {
    let mut command = Command::new(UPSTREAM);
    command.args(["serve", "--listen", "0.0.0.0:8080", "--name", name]);
    let server = node.spawn_in_pod(pod, command).unwrap();
    server
        .stdout()
        .wait_for_json(
            |line| line["listening"].is_string(),
            Duration::from_secs(10),
        )
        .unwrap();
    server
}

/// `count` keep-alive GETs of the service from the client pod; the client's summary.
fn get(node: &SimNode, client: &Pod, count: &str) -> Value {
    let mut command = Command::new(UPSTREAM);
    command.args(["get", "--url", "http://hello:8080/", "--quiet"]);
    command.args(["--count", count, "--concurrency", CONNECTIONS]);
    command.args(["--timeout-secs", "60"]);
    let mut process = node.spawn_in_pod(client, command).unwrap();
    assert!(process.finish(Duration::from_secs(3600)).unwrap().success());
    let lines = process.stdout().json_lines();
    lines.last().cloned().expect("a summary line")
}

/// The agent starts some 50 times slower under callgrind.
fn wait_ready(node: &SimNode, agent: &PodProcess) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !matches!(
        agent::admin_request(&node.netns_path(), "GET", "/ready", ""),
        Ok((200, _))
    ) {
        assert!(
            !agent.stderr().is_closed(),
            "the agent exited:\n{}",
            agent.stderr().text()
        );
        assert!(
            Instant::now() < deadline,
            "the agent was not ready in 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn callgrind_control(args: &[&str], pid: u32) {
    let status = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "callgrind_control {args:?}");
}

/// The profile written by `callgrind_control -d`: `callgrind.out.1` (the final one at exit
/// is `callgrind.out`).
fn dump_file(dir: &Path) -> PathBuf {
    let dump = dir.join("callgrind.out.1");
    assert!(dump.is_file(), "no dump in {}", dir.display());
    dump
}

/// Total instructions, and calls per callee made from outside mimalloc.
fn read_profile(path: &Path) -> (u64, HashMap<String, u64>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names: HashMap<String, String> = HashMap::new();
    // `fn=(12) name` defines id 12; later `fn=(12)` refers to it (cfn shares the ids).
    let mut name_of = |spec: &str| -> String {
        let spec = spec.trim();
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) => {
                let rest = rest.trim();
                if !rest.is_empty() {
                    names.insert(id.to_owned(), rest.to_owned());
                }
                names.get(id).cloned().unwrap_or_default()
            }
            None => spec.to_owned(),
        }
    };
    let (mut total, mut caller, mut callee) = (0, String::new(), String::new());
    let mut calls: HashMap<String, u64> = HashMap::new();
    for line in text.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            caller = name_of(spec);
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            callee = name_of(spec);
        } else if let Some(rest) = line.strip_prefix("calls=") {
            let count: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
            if !caller.starts_with("mi_") && !caller.starts_with("_mi_") {
                *calls.entry(callee.clone()).or_default() += count;
            }
        } else if let Some(n) = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
        {
            total = n.trim().parse().unwrap();
        }
    }
    (total, calls)
}
