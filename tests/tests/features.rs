//! The traffic features of `deploy/examples/features/`, each file used as it is documented,
//! through the real thing: client pods whose connections the kernel hands to the agent, the
//! agent's proxy, and `upstream` servers in their own pods that log every request they receive.
//! What the engine decides is unit-tested in `mesh-agent/src/engine/tests.rs`; these tests prove
//! the proxy carries it out: fault injection, mirroring, request matching, route and per-try
//! timeouts with retries, header rules and rewrites.
//!
//! One simulated node and one agent per example file, so the tests run side by side.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(60);
const PORT: u16 = 8080;

/// A node with a client pod, services of `upstream serve --log` pods, an example's rules and
/// the agent.
struct Mesh {
    node: SimNode,
    client: Pod,
    config: ConfigDir,
    /// Each backend pod's server, by pod name.
    servers: BTreeMap<String, PodProcess>,
    next_vip: u8,
}

/// A pod behind a service: its name, labels, and extra `upstream serve` flags.
struct Replica<'a> {
    pod: &'a str,
    labels: &'a [(&'a str, &'a str)],
    serve: &'a [&'a str],
}

impl Mesh {
    fn new() -> Mesh {
        require_root();
        let node = SimNode::new().unwrap();
        let client = node.add_pod("client").unwrap();
        Mesh {
            node,
            client,
            config: ConfigDir::new().unwrap(),
            servers: BTreeMap::new(),
            next_vip: 10,
        }
    }

    /// Service `name` on port 8080 at the next virtual IP, one pod per replica, each serving
    /// with `--name <pod> --log`.
    fn service(&mut self, name: &str, replicas: &[Replica<'_>]) {
        let vip = Ipv4Addr::new(10, 96, 0, self.next_vip);
        self.next_vip += 1;
        self.node.add_host(name, vip).unwrap();
        let mut pods = Vec::new();
        for replica in replicas {
            let pod = self.node.add_pod(replica.pod).unwrap();
            let mut serve = Command::new(UPSTREAM);
            serve
                .args([
                    "serve",
                    "--listen",
                    "0.0.0.0:8080",
                    "--name",
                    replica.pod,
                    "--log",
                ])
                .args(replica.serve);
            let server = self.node.spawn_in_pod(&pod, serve).unwrap();
            server
                .stdout()
                .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
                .unwrap();
            self.servers.insert(replica.pod.to_owned(), server);
            pods.push(pod);
        }
        let backends: Vec<Backend<'_>> = pods
            .iter()
            .zip(replicas)
            .map(|(pod, replica)| Backend {
                pod,
                labels: replica.labels,
            })
            .collect();
        self.config
            .service(name, vip, PORT, "http", &backends)
            .unwrap();
    }

    /// Copies `deploy/examples/features/<file>` into the config folder, unchanged.
    fn example(&self, file: &str) {
        self.config
            .copy_example(&format!("features/{file}"), file)
            .unwrap();
    }

    fn agent(&self) -> Agent {
        let config = self.config.path().to_str().unwrap().to_owned();
        Agent::start(&self.node, &[&self.client], &["--config", &config]).unwrap()
    }

    /// Runs `upstream get <args>` in the client pod: one line per response, then the summary.
    fn get(&self, args: &[&str]) -> (Vec<Value>, Value) {
        let mut command = Command::new(UPSTREAM);
        command.arg("get").args(args);
        let mut process = self.node.spawn_in_pod(&self.client, command).unwrap();
        let status = process.finish(TIMEOUT).unwrap();
        assert!(status.success(), "{}", process.stderr().text());
        let mut lines = process.stdout().json_lines();
        let summary = lines.pop().expect("the client printed nothing");
        assert_eq!(summary["summary"], true, "{summary}");
        (lines, summary)
    }

    /// One GET (or `--method`) with `args` added; its response line.
    fn one(&self, url: &str, args: &[&str]) -> Value {
        let mut all = vec!["--url", url];
        all.extend(args);
        let (mut lines, _) = self.get(&all);
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines.remove(0)
    }

    /// The requests `pod`'s server has logged so far whose path starts with `path`.
    fn received(&self, pod: &str, path: &str) -> Vec<Value> {
        self.server(pod)
            .stdout()
            .json_lines()
            .into_iter()
            .filter(|line| line["request"].is_u64() && starts_with(&line["path"], path))
            .collect()
    }

    /// Waits until `pod` has logged `n` requests under `path`, then, after `settle`, returns
    /// all it has logged there (so a test also sees any beyond `n`).
    fn wait_received(&self, pod: &str, path: &str, n: usize, settle: Duration) -> Vec<Value> {
        self.server(pod)
            .stdout()
            .wait_for_json_lines(
                n,
                |line| line["request"].is_u64() && starts_with(&line["path"], path),
                TIMEOUT,
            )
            .unwrap_or_else(|error| {
                panic!(
                    "{pod} did not receive {n} requests under {path}: {error:#}; it has {:?}",
                    self.received(pod, path)
                )
            });
        std::thread::sleep(settle);
        self.received(pod, path)
    }

    fn server(&self, pod: &str) -> &PodProcess {
        self.servers
            .get(pod)
            .unwrap_or_else(|| panic!("no server in pod {pod}"))
    }
}

fn starts_with(value: &Value, prefix: &str) -> bool {
    value.as_str().is_some_and(|s| s.starts_with(prefix))
}

fn elapsed_ms(line: &Value) -> f64 {
    line["elapsed_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no elapsed_ms in {line}"))
}

/// Each response line's latency by its request id (`--request-ids`).
fn by_request_id(lines: &[Value]) -> BTreeMap<String, f64> {
    lines
        .iter()
        .map(|line| {
            let id = line["request_id"].as_str().expect("run with --request-ids");
            (id.to_owned(), elapsed_ms(line))
        })
        .collect()
}

fn count(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

/// The agent's access-log records of requests whose path starts with `path`, once there are
/// `n` of them.
fn logged(agent: &Agent, path: &str, n: usize) -> Vec<Value> {
    agent
        .wait_for_records(
            n,
            |r| r["kind"] == "http" && starts_with(&r["path"], path),
            TIMEOUT,
        )
        .unwrap()
}

fn flags(record: &Value) -> &str {
    record["response_flags"].as_str().unwrap_or("")
}

fn has_flag(record: &Value, flag: &str) -> bool {
    flags(record).split(',').any(|f| f == flag)
}

/// `istio_requests_total` for `service` with this response code and flags, from the agent's
/// Prometheus endpoint. Read as text: prometheus-parse splits label values at commas, and
/// flags such as `UT,URX` have them.
fn istio_requests(agent: &Agent, service: &str, code: &str, flags: &str) -> f64 {
    let (status, text) = agent.admin_get("/stats/prometheus").unwrap();
    assert_eq!(status, 200, "{text}");
    let labels = [
        format!("destination_service_name=\"{service}\""),
        format!("response_code=\"{code}\""),
        format!("response_flags=\"{flags}\""),
    ];
    text.lines()
        .filter(|line| line.starts_with("istio_requests_total{"))
        .filter(|line| labels.iter().all(|label| line.contains(label.as_str())))
        .map(|line| {
            let (_, value) = line
                .rsplit_once(' ')
                .expect("a sample line ends with its value");
            value.parse::<f64>().expect("a sample's value is a number")
        })
        .sum()
}

// ---------------------------------------------------------------------------------- faults

/// `fault-injection.yml`, route `x-chaos: delay-and-abort`: a 2 s delay for 12.5% and a 503
/// abort for 0.1% of requests. The engine spreads percentages exactly (after N decisions,
/// exactly ⌊N·p⌋ were chosen; docs/configuration.md, "Fault injection"), so over 1,000 requests
/// exactly 125 are delayed and exactly 1 is aborted: any other count is a bug, where random
/// sampling (Envoy's) would need a binomial tolerance. The upstream counts what reached it.
#[test]
fn fault_injection_delays_and_aborts_exact_shares_and_aborted_requests_never_reach_the_upstream() {
    let mut mesh = Mesh::new();
    mesh.service(
        "service-f",
        &[Replica {
            pod: "service-f-0",
            labels: &[("app", "service-f")],
            serve: &[],
        }],
    );
    mesh.example("fault-injection.yml");
    let agent = mesh.agent();

    let started = Instant::now();
    let (lines, summary) = mesh.get(&[
        "--url",
        "http://service-f:8080/chaos",
        "--count",
        "1000",
        // Four requests per connection: the 125 two-second delays overlap.
        "--concurrency",
        "250",
        "--header",
        "x-chaos: delay-and-abort",
        "--request-ids",
        "chaos",
    ]);
    println!("1,000 chaos requests in {:?}: {summary}", started.elapsed());
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(count(&summary, "by_status", "200"), 999, "{summary}");
    assert_eq!(count(&summary, "by_status", "503"), 1, "{summary}");
    let aborted: Vec<&Value> = lines.iter().filter(|l| l["status"] == 503).collect();
    assert_eq!(aborted[0]["body"], "fault filter abort", "{}", aborted[0]);
    assert_eq!(
        aborted[0]["headers"]["x-mesh-response-flags"], "FI",
        "{}",
        aborted[0]
    );

    // The agent's view: exactly 125 DI, each held 2 s (by the agent's clock and the client's);
    // exactly one FI.
    let records = logged(&agent, "/chaos", 1000);
    assert_eq!(records.len(), 1000);
    let di: Vec<&Value> = records.iter().filter(|r| has_flag(r, "DI")).collect();
    assert_eq!(di.len(), 125);
    let took = by_request_id(&lines);
    for record in &di {
        assert!(
            record["duration_us"].as_u64().unwrap() >= 2_000_000,
            "{record}"
        );
        let id = record["request_id"].as_str().unwrap();
        assert!(
            took[id] >= 2000.0,
            "{id} took {} ms at the client",
            took[id]
        );
    }
    let fi: Vec<&Value> = records.iter().filter(|r| has_flag(r, "FI")).collect();
    assert_eq!(fi.len(), 1, "{fi:?}");
    assert_eq!(fi[0]["status"], 503, "{}", fi[0]);
    assert_eq!(
        fi[0]["attempts"], 0,
        "an aborted request makes no attempt: {}",
        fi[0]
    );
    assert!(fi[0]["endpoint"].is_null(), "{}", fi[0]);

    // The upstream saw exactly the 999 others, and never the aborted request's id.
    let received = mesh.wait_received("service-f-0", "/chaos", 999, Duration::from_millis(300));
    assert_eq!(received.len(), 999);
    let aborted_id = fi[0]["request_id"].as_str().unwrap();
    assert!(
        received.iter().all(|r| r["request_id"] != aborted_id),
        "the aborted request {aborted_id} reached the upstream"
    );
    let flags_of = |code, flags| istio_requests(&agent, "service-f", code, flags);
    assert_eq!(flags_of("503", "FI") + flags_of("503", "DI,FI"), 1.0);
    assert_eq!(flags_of("200", "DI") + flags_of("503", "DI,FI"), 125.0);

    // Route `x-chaos: legacy-percent`: the deprecated integer `percent: 10`, a 250 ms delay.
    let (lines, summary) = mesh.get(&[
        "--url",
        "http://service-f:8080/legacy",
        "--count",
        "100",
        "--concurrency",
        "10",
        "--header",
        "x-chaos: legacy-percent",
        "--request-ids",
        "legacy",
    ]);
    assert_eq!(count(&summary, "by_status", "200"), 100, "{summary}");
    let records = logged(&agent, "/legacy", 100);
    let di: Vec<&Value> = records.iter().filter(|r| has_flag(r, "DI")).collect();
    assert_eq!(di.len(), 10);
    let took = by_request_id(&lines);
    for record in &di {
        let id = record["request_id"].as_str().unwrap();
        assert!(took[id] >= 250.0, "{id} took {} ms at the client", took[id]);
    }
    assert_eq!(mesh.received("service-f-0", "/legacy").len(), 100);

    // Without the header the last route applies: no fault at all.
    let (_, summary) = mesh.get(&[
        "--url",
        "http://service-f:8080/plain",
        "--count",
        "50",
        "--quiet",
    ]);
    assert_eq!(count(&summary, "by_status", "200"), 50, "{summary}");
    let records = logged(&agent, "/plain", 50);
    assert!(records.iter().all(|r| flags(r) == "-"), "{records:?}");
}

// ------------------------------------------------------------------------------- mirroring

/// How long the shadow holds every answer: far longer than any client request may take.
const SHADOW_DELAY_MS: u64 = 5000;

/// `mirroring.yml`: `/checkout` goes to the stable subset with 25.5% copied to the candidate
/// subset; everything else goes to stable with every request copied to `service-g-shadow`,
/// which here answers only after 5 s. Copies carry the `-shadow` host suffix, answers come from
/// stable only, and no client waits for a copy.
#[test]
fn mirroring_copies_to_the_shadow_with_a_shadow_host_and_the_client_never_waits_for_it() {
    let mut mesh = Mesh::new();
    mesh.service(
        "service-g",
        &[
            Replica {
                pod: "service-g-stable-0",
                labels: &[("app", "service-g"), ("track", "stable")],
                serve: &[],
            },
            Replica {
                pod: "service-g-candidate-0",
                labels: &[("app", "service-g"), ("track", "candidate")],
                serve: &[],
            },
        ],
    );
    let shadow_delay = SHADOW_DELAY_MS.to_string();
    mesh.service(
        "service-g-shadow",
        &[Replica {
            pod: "service-g-shadow-0",
            labels: &[("app", "service-g-shadow")],
            serve: &["--delay-ms", &shadow_delay],
        }],
    );
    mesh.example("mirroring.yml");
    let agent = mesh.agent();

    // Every request of the last route is mirrored to the slow shadow. Envoy puts the suffix on
    // the host, before the port: `service-g:8080` is copied as `service-g-shadow:8080`.
    let started = Instant::now();
    let (lines, summary) = mesh.get(&["--url", "http://service-g:8080/orders", "--count", "20"]);
    let took = started.elapsed();
    println!("20 mirrored requests in {took:?} with a shadow answering after {shadow_delay} ms");
    assert_eq!(
        count(&summary, "by_body", "service-g-stable-0"),
        20,
        "{summary}"
    );
    for line in &lines {
        assert_eq!(
            line["headers"]["x-served-by"], "service-g-stable-0",
            "{line}"
        );
        assert!(
            elapsed_ms(line) < SHADOW_DELAY_MS as f64 / 2.0,
            "a client waited for the shadow: {line}"
        );
    }
    // Twenty sequential requests finished before the shadow answered even the first copy.
    assert!(took < Duration::from_millis(SHADOW_DELAY_MS), "{took:?}");
    let copies = mesh.wait_received("service-g-shadow-0", "/orders", 20, Duration::ZERO);
    assert_eq!(copies.len(), 20);
    for copy in &copies {
        assert_eq!(copy["host"], "service-g-shadow:8080", "{copy}");
        assert_eq!(copy["method"], "GET", "{copy}");
    }
    let primaries = mesh.received("service-g-stable-0", "/orders");
    assert_eq!(primaries.len(), 20);
    assert!(
        primaries.iter().all(|r| r["host"] == "service-g:8080"),
        "{primaries:?}"
    );
    // A copy is the same request: the trace's request id travels with it.
    let mut ids: Vec<&str> = copies
        .iter()
        .filter_map(|c| c["request_id"].as_str())
        .collect();
    let mut primary_ids: Vec<&str> = primaries
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    ids.sort_unstable();
    primary_ids.sort_unstable();
    assert_eq!(ids, primary_ids);
    assert!(mesh.received("service-g-candidate-0", "/").is_empty());

    // `/checkout`: 25.5% of 200 requests is exactly 51 copies to the candidate subset.
    let (_, summary) = mesh.get(&[
        "--url",
        "http://service-g:8080/checkout",
        "--count",
        "200",
        "--concurrency",
        "10",
        "--quiet",
    ]);
    assert_eq!(
        count(&summary, "by_body", "service-g-stable-0"),
        200,
        "{summary}"
    );
    let copies = mesh.wait_received(
        "service-g-candidate-0",
        "/checkout",
        51,
        Duration::from_millis(300),
    );
    assert_eq!(copies.len(), 51);
    assert!(
        copies.iter().all(|c| c["host"] == "service-g-shadow:8080"),
        "{copies:?}"
    );
    assert_eq!(mesh.received("service-g-stable-0", "/checkout").len(), 200);
    assert!(mesh.received("service-g-shadow-0", "/checkout").is_empty());
    // The access log has the client's requests only, each answered by stable.
    let records = logged(&agent, "/checkout", 200);
    assert_eq!(records.len(), 200);
    assert!(records.iter().all(|r| r["destination_subset"] == "stable"));
}

/// HTTP/2 (and so gRPC) requests are mirrored like HTTP/1.1 ones, and every HTTP/2 try
/// carries the client's `:authority`, not the endpoint's address.
#[test]
fn http2_requests_keep_their_authority_and_are_mirrored_too() {
    let mut mesh = Mesh::new();
    mesh.service(
        "service-g",
        &[Replica {
            pod: "service-g-stable-0",
            labels: &[("app", "service-g"), ("track", "stable")],
            serve: &[],
        }],
    );
    mesh.service(
        "service-g-shadow",
        &[Replica {
            pod: "service-g-shadow-0",
            labels: &[("app", "service-g-shadow")],
            serve: &[],
        }],
    );
    mesh.example("mirroring.yml");
    let _agent = mesh.agent();
    let line = mesh.one(
        "http://service-g:8080/orders",
        &["--h2", "--header", "x-request-id: h2-copy"],
    );
    assert_eq!(line["status"], 200, "{line}");
    let primaries = mesh.received("service-g-stable-0", "/orders");
    assert_eq!(primaries.len(), 1, "{primaries:?}");
    assert_eq!(primaries[0]["host"], "service-g:8080", "{}", primaries[0]);
    let copies = mesh.wait_received(
        "service-g-shadow-0",
        "/orders",
        1,
        Duration::from_millis(300),
    );
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0]["request_id"], "h2-copy", "{}", copies[0]);
    assert_eq!(copies[0]["host"], "service-g-shadow:8080", "{}", copies[0]);
}

// -------------------------------------------------------------------------------- matching

/// `matching.yml`: every match kind, tried in order; a matching route sends to v2, the last
/// route catches everything else for v1.
#[test]
fn every_match_kind_routes_to_its_destination_and_the_rest_falls_through() {
    let mut mesh = Mesh::new();
    mesh.service(
        "service-b",
        &[
            Replica {
                pod: "service-b-v1-0",
                labels: &[("app", "service-b"), ("version", "v1")],
                serve: &[],
            },
            Replica {
                pod: "service-b-v2-0",
                labels: &[("app", "service-b"), ("version", "v2")],
                serve: &[],
            },
        ],
    );
    mesh.example("matching.yml");
    let agent = mesh.agent();

    let canary = [
        "--header",
        "x-user: tester",
        "--header",
        "x-client-version: 2.4.1",
        "--header",
        "user-agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = canary.to_vec();
        args.extend(extra);
        args
    };
    let b = "http://service-b:8080";
    #[rustfmt::skip]
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        // exact-uri-and-method: uri exact /health AND method exact GET.
        ("uri exact and method", format!("{b}/health"), vec![], "v2"),
        ("method differs", format!("{b}/health"), vec!["--method", "POST"], "v1"),
        ("uri exact is not a prefix", format!("{b}/health/live"), vec![], "v1"),
        ("uri exact ignores the query", format!("{b}/health?verbose=1"), vec![], "v2"),
        // case-insensitive-prefix: prefix /API/ with ignoreUriCase.
        ("uri prefix", format!("{b}/API/orders"), vec![], "v2"),
        ("uri prefix, other case", format!("{b}/api/Orders"), vec![], "v2"),
        ("uri prefix needs its slash", format!("{b}/apiary"), vec![], "v1"),
        // regex-uri-scheme-authority-port: a full-match regex, scheme http, authority
        // prefix service-b, port 8080.
        ("uri regex", format!("{b}/items/42"), vec![], "v2"),
        ("uri regex is anchored", format!("{b}/items/42/reviews"), vec![], "v1"),
        ("uri regex miss", format!("{b}/items/abc"), vec![], "v1"),
        ("authority by FQDN", format!("{b}/items/42"),
            vec!["--header", "host: service-b.default.svc.cluster.local:8080"], "v2"),
        ("h2 scheme http", format!("{b}/items/42"), vec!["--h2"], "v2"),
        ("h2 scheme https", "https://service-b:8080/items/42".into(), vec!["--h2"], "v1"),
        // headers-and-query, first entry: three headers, a header that must be absent, a
        // query parameter, all ANDed.
        ("headers and query", format!("{b}/?canary=yes"), with(&[]), "v2"),
        ("a header missing", format!("{b}/?canary=yes"), canary[2..].to_vec(), "v1"),
        ("header exact is case sensitive", format!("{b}/?canary=yes"),
            vec!["--header", "x-user: Tester", "--header", "x-client-version: 2.0",
                 "--header", "user-agent: Firefox"], "v1"),
        ("header prefix miss", format!("{b}/?canary=yes"),
            vec!["--header", "x-user: tester", "--header", "x-client-version: 1.9",
                 "--header", "user-agent: Firefox"], "v1"),
        ("header regex miss", format!("{b}/?canary=yes"),
            vec!["--header", "x-user: tester", "--header", "x-client-version: 2.0",
                 "--header", "user-agent: curl/8.5.0"], "v1"),
        ("withoutHeaders present", format!("{b}/?canary=yes"),
            with(&["--header", "x-skip-canary: true"]), "v1"),
        ("withoutHeaders other value", format!("{b}/?canary=yes"),
            with(&["--header", "x-skip-canary: false"]), "v2"),
        ("query value differs", format!("{b}/?canary=no"), with(&[]), "v1"),
        ("query absent", format!("{b}/"), with(&[]), "v1"),
        // headers-and-query, second entry (ORed): queryParams debug regex 1|true, gateway mesh.
        ("query regex", format!("{b}/?debug=1"), vec![], "v2"),
        ("query regex, other alternative", format!("{b}/x?a=b&debug=true"), vec![], "v2"),
        ("query regex is anchored", format!("{b}/?debug=10"), vec![], "v1"),
        ("query without a value", format!("{b}/?debug"), vec![], "v1"),
        // No route above matches: the last route, without match, takes it.
        ("falls through", format!("{b}/"), vec![], "v1"),
        ("falls through, POST", format!("{b}/anything"), vec!["--method", "POST"], "v1"),
    ];
    let mut wrong = Vec::new();
    for (i, (name, url, args, subset)) in cases.iter().enumerate() {
        let id = format!("x-request-id: case-{i}");
        let mut args = args.clone();
        args.extend(["--header", &id]);
        let line = mesh.one(url, &args);
        let expected = format!("service-b-{subset}-0");
        let served_by = &line["headers"]["x-served-by"];
        if line["status"] != 200 || served_by != expected.as_str() {
            wrong.push(format!(
                "{name}: {url} {args:?} went to {served_by} ({}), expected {expected}",
                line["status"]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The agent says the same: every request was routed to the subset it reached.
    let records = agent
        .wait_for_records(cases.len(), |r| r["kind"] == "http", TIMEOUT)
        .unwrap();
    for (i, (name, _, _, subset)) in cases.iter().enumerate() {
        let id = format!("case-{i}");
        let record = records
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no record of {name} ({id})"));
        assert_eq!(record["destination_subset"], *subset, "{name}: {record}");
    }
}

// --------------------------------------------------------------------- timeouts and retries

/// `timeouts-and-retries.yml` on one replica whose answers the query can hold: the route
/// timeout ends a request with 504 `UT` long before the upstream would answer; a per-try timeout
/// gives up on a hung try and the retry answers; tries are counted at the upstream and in the
/// access log.
#[test]
fn route_and_per_try_timeouts_answer_in_time_and_retries_are_counted() {
    let mut mesh = Mesh::new();
    mesh.service(
        "service-e",
        &[Replica {
            pod: "service-e-0",
            labels: &[("app", "service-e")],
            serve: &[],
        }],
    );
    mesh.example("timeouts-and-retries.yml");
    let agent = mesh.agent();
    let e = "http://service-e:8080";

    // Route `no-retries` (POST): timeout 0.5 s, attempts 0. The upstream would take 10 s.
    let line = mesh.one(
        &format!("{e}/slow?delay_ms=10000"),
        &[
            "--method",
            "POST",
            "--header",
            "x-request-id: route-timeout",
        ],
    );
    assert_eq!(line["status"], 504, "{line}");
    assert_eq!(line["body"], "upstream request timeout", "{line}");
    assert_eq!(line["headers"]["x-mesh-response-flags"], "UT", "{line}");
    let took = elapsed_ms(&line);
    assert!((500.0..2500.0).contains(&took), "answered after {took} ms");
    let record = &logged(&agent, "/slow", 1)[0];
    assert_eq!(record["status"], 504, "{record}");
    assert_eq!(flags(record), "UT", "{record}");
    assert_eq!(record["attempts"], 1, "{record}");
    assert_eq!(istio_requests(&agent, "service-e", "504", "UT"), 1.0);
    assert_eq!(mesh.received("service-e-0", "/slow").len(), 1, "tried once");

    // Route `every-condition` (/orders): perTryTimeout 500 ms, 4 retries. The first try hangs
    // (the upstream holds only the first try of this request id); the retry answers at once.
    let line = mesh.one(
        &format!("{e}/orders/1?delay_ms=10000&delay_tries=1"),
        &["--header", "x-request-id: first-try-hangs"],
    );
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["body"], "service-e-0", "{line}");
    let took = elapsed_ms(&line);
    assert!((500.0..2500.0).contains(&took), "answered after {took} ms");
    let record = &logged(&agent, "/orders/1", 1)[0];
    assert_eq!(record["attempts"], 2, "{record}");
    assert_eq!(flags(record), "-", "{record}");
    let tries = mesh.received("service-e-0", "/orders/1");
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert!(tries.iter().all(|t| t["request_id"] == "first-try-hangs"));

    // Every try hangs: 1 + 4 tries of 500 ms each (plus backoff under 25+50+100+200 ms), then
    // 504 `UT,URX`, far inside the route's 1m30s and before the first try would have answered.
    let line = mesh.one(
        &format!("{e}/orders/2?delay_ms=10000"),
        &["--header", "x-request-id: every-try-hangs"],
    );
    assert_eq!(line["status"], 504, "{line}");
    assert_eq!(line["headers"]["x-mesh-response-flags"], "UT,URX", "{line}");
    let took = elapsed_ms(&line);
    assert!((2500.0..5000.0).contains(&took), "answered after {took} ms");
    let record = &logged(&agent, "/orders/2", 1)[0];
    assert_eq!(record["attempts"], 5, "{record}");
    assert_eq!(flags(record), "UT,URX", "{record}");
    assert_eq!(mesh.received("service-e-0", "/orders/2").len(), 5);
    assert_eq!(istio_requests(&agent, "service-e", "504", "UT,URX"), 1.0);

    // Route `istio-default-conditions`: attempts 2 without retryOn retries a 503 (Istio's
    // default conditions) but not a 500.
    let line = mesh.one(&format!("{e}/status/503"), &[]);
    assert_eq!(line["status"], 503, "{line}");
    let record = &logged(&agent, "/status/503", 1)[0];
    assert_eq!(record["attempts"], 3, "{record}");
    assert_eq!(flags(record), "URX", "{record}");
    assert_eq!(mesh.received("service-e-0", "/status/503").len(), 3);
    let line = mesh.one(&format!("{e}/status/500"), &[]);
    assert_eq!(line["status"], 500, "{line}");
    assert_eq!(logged(&agent, "/status/500", 1)[0]["attempts"], 1);
    assert_eq!(mesh.received("service-e-0", "/status/500").len(), 1);
}

// ------------------------------------------------------------------- headers and rewrites

/// `headers-and-rewrite.yml`: the `/legacy/` route rewrites the path prefix and the authority,
/// sets, adds and removes request headers, sets and removes response headers, splits 70/30 and
/// adds per-destination headers; the catch-all route touches nothing (the control: what the
/// rules remove is there without them). The upstream answers `…/headers` with the request it
/// received.
#[test]
fn header_rules_and_rewrites_reach_the_upstream_and_the_client_per_destination() {
    let mut mesh = Mesh::new();
    for name in ["service-d", "service-d-next"] {
        mesh.service(
            name,
            &[Replica {
                pod: &format!("{name}-0"),
                labels: &[("app", name)],
                serve: &[],
            }],
        );
    }
    mesh.example("headers-and-rewrite.yml");
    let _agent = mesh.agent();

    let (lines, summary) = mesh.get(&[
        "--url",
        "http://service-d:8080/legacy/headers",
        "--count",
        "20",
        "--header",
        "x-internal-debug: 1",
    ]);
    assert_eq!(summary["errors"], 0, "{summary}");
    let mut served = BTreeMap::<String, u32>::new();
    for line in &lines {
        assert_eq!(line["status"], 200, "{line}");
        let received: Value = serde_json::from_str(line["body"].as_str().unwrap()).unwrap();
        assert_eq!(received[":path"], "/v2/headers", "{received}");
        assert_eq!(
            received["host"], "service-d.default.svc.cluster.local",
            "{received}"
        );
        assert_eq!(received["x-mesh-route"], "legacy", "{received}");
        assert_eq!(received["x-forwarded-prefix"], "/legacy", "{received}");
        assert!(received.get("x-internal-debug").is_none(), "{received}");
        let headers = &line["headers"];
        assert_eq!(headers["cache-control"], "no-store", "{line}");
        assert!(headers.get("server").is_none(), "{line}");
        let by = headers["x-served-by"].as_str().unwrap();
        match by {
            "service-d-0" => assert_eq!(received["x-destination"], "primary", "{received}"),
            "service-d-next-0, next" => {
                assert!(received.get("x-destination").is_none(), "{received}")
            }
            other => panic!("served by {other:?}: {line}"),
        }
        *served.entry(by.to_owned()).or_default() += 1;
    }
    // Weights 70/30 are a smooth round-robin of period 10: exact over 20 requests.
    assert_eq!(served["service-d-0"], 14, "{served:?}");
    assert_eq!(served["service-d-next-0, next"], 6, "{served:?}");

    let line = mesh.one("http://service-d:8080/other/headers", &[]);
    let received: Value = serde_json::from_str(line["body"].as_str().unwrap()).unwrap();
    assert_eq!(received[":path"], "/other/headers", "{received}");
    assert_eq!(received["host"], "service-d:8080", "{received}");
    assert!(received.get("x-mesh-route").is_none(), "{received}");
    assert_eq!(line["headers"]["server"], "upstream", "{line}");
    assert!(line["headers"].get("cache-control").is_none(), "{line}");
}
