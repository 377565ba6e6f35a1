//! The Gateway API routes of `deploy/examples/gateway-api/` (HTTPRoutes attached to Services,
//! GAMMA), each file used as it is written, through the real thing: a client pod whose
//! connections the kernel hands to the agent, the agent's proxy, and `upstream` servers in their
//! own pods that log every request they receive. How routes are read and merged is unit-tested in
//! `mesh-agent/src/config/gateway_api/tests.rs`; these tests prove what a client and a backend
//! see: which backend answered, the path, `Host` and headers it received, the response headers,
//! redirects, mirrored copies, timeouts, exact weighted shares, and the Service's 404 and 500.
//! Next to `split.yml` the test writes a route of its own, whose rules warn (no example may):
//! rules without a backend, and one with a filter this mesh does not implement.
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

/// A node with a client pod, Services of `upstream serve --log` pods, an example's routes and
/// the agent.
struct Mesh {
    node: SimNode,
    client: Pod,
    config: ConfigDir,
    /// Each server by name: its pod's name on port 8080, `<pod>:<port>` on any other.
    servers: BTreeMap<String, PodProcess>,
    next_vip: u8,
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

    /// Service `name` on port 8080 at the next virtual IP, selecting pod `<name>-0`, which
    /// serves with `--name <name>-0 --log` and `serve` added.
    fn service(&mut self, name: &str, serve: &[&str]) {
        let vip = self.host(name);
        let pod = self.pod(&format!("{name}-0"), &[PORT], serve);
        let backend = Backend {
            pod: &pod,
            labels: &[("app", name)],
        };
        self.config
            .service(name, vip, PORT, "http", &[backend])
            .unwrap();
    }

    /// Services of their own (port 8080, one pod each) for every name.
    fn services(&mut self, names: &[&str]) {
        for name in names {
            self.service(name, &[]);
        }
    }

    /// The next virtual IP, which `name` resolves to in every pod.
    fn host(&mut self, name: &str) -> Ipv4Addr {
        let vip = Ipv4Addr::new(10, 96, 0, self.next_vip);
        self.next_vip += 1;
        self.node.add_host(name, vip).unwrap();
        vip
    }

    /// Pod `pod` with one `upstream serve --log` per port, named as [`Mesh::servers`] says.
    fn pod(&mut self, pod: &str, ports: &[u16], serve: &[&str]) -> Pod {
        let created = self.node.add_pod(pod).unwrap();
        for &port in ports {
            let name = match port {
                PORT => pod.to_owned(),
                other => format!("{pod}:{other}"),
            };
            let mut command = Command::new(UPSTREAM);
            command
                .arg("serve")
                .arg("--listen")
                .arg(format!("0.0.0.0:{port}"))
                .args(["--name", &name, "--log"])
                .args(serve);
            let server = self.node.spawn_in_pod(&created, command).unwrap();
            server
                .stdout()
                .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
                .unwrap();
            self.servers.insert(name, server);
        }
        created
    }

    /// Copies `deploy/examples/gateway-api/<file>` into the config folder, unchanged.
    fn example(&self, file: &str) {
        self.config
            .copy_example(&format!("gateway-api/{file}"), file)
            .unwrap();
    }

    fn agent(&self) -> Agent {
        self.agent_with(&[])
    }

    fn agent_with(&self, args: &[&str]) -> Agent {
        let config = self.config.path().to_str().unwrap().to_owned();
        let mut all = vec!["--config", &config];
        all.extend(args);
        Agent::start(&self.node, &[&self.client], &all).unwrap()
    }

    /// Starts `upstream get <args>` in the client pod.
    fn spawn_get(&self, args: &[&str]) -> PodProcess {
        let mut command = Command::new(UPSTREAM);
        command.arg("get").args(args);
        self.node.spawn_in_pod(&self.client, command).unwrap()
    }

    /// Waits for a client [`Mesh::spawn_get`] started: one line per response, then the summary.
    fn finish_get(mut process: PodProcess) -> (Vec<Value>, Value) {
        let status = process.finish(TIMEOUT).unwrap();
        assert!(status.success(), "{}", process.stderr().text());
        let mut lines = process.stdout().json_lines();
        let summary = lines.pop().expect("the client printed nothing");
        assert_eq!(summary["summary"], true, "{summary}");
        (lines, summary)
    }

    /// Runs `upstream get <args>` in the client pod: one line per response, then the summary.
    fn get(&self, args: &[&str]) -> (Vec<Value>, Value) {
        Mesh::finish_get(self.spawn_get(args))
    }

    /// One GET (or `--method`) with `args` added; its response line.
    fn one(&self, url: &str, args: &[&str]) -> Value {
        let mut all = vec!["--url", url];
        all.extend(args);
        let (mut lines, _) = self.get(&all);
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines.remove(0)
    }

    /// The requests server `name` has logged so far whose path starts with `path`.
    fn received(&self, name: &str, path: &str) -> Vec<Value> {
        self.server(name)
            .stdout()
            .json_lines()
            .into_iter()
            .filter(|line| line["request"].is_u64() && starts_with(&line["path"], path))
            .collect()
    }

    /// Waits until server `name` has logged `n` requests under `path`, then, after `settle`,
    /// returns all it has logged there (so a test also sees any beyond `n`).
    fn wait_received(&self, name: &str, path: &str, n: usize, settle: Duration) -> Vec<Value> {
        self.server(name)
            .stdout()
            .wait_for_json_lines(
                n,
                |line| line["request"].is_u64() && starts_with(&line["path"], path),
                TIMEOUT,
            )
            .unwrap_or_else(|error| {
                panic!(
                    "{name} did not receive {n} requests under {path}: {error:#}; it has {:?}",
                    self.received(name, path)
                )
            });
        std::thread::sleep(settle);
        self.received(name, path)
    }

    fn server(&self, name: &str) -> &PodProcess {
        self.servers
            .get(name)
            .unwrap_or_else(|| panic!("no server {name}"))
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

fn count(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

/// What the upstream received, from its answer to a path ending in `/headers`.
fn echoed(line: &Value) -> Value {
    assert_eq!(line["status"], 200, "{line}");
    let body = line["body"].as_str().expect("a body");
    serde_json::from_str(body).unwrap_or_else(|error| panic!("{error}: {line}"))
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

// -------------------------------------------------------------------------------- matching

/// `matching.yml`: every match kind (path Exact, PathPrefix, RegularExpression; header Exact
/// and RegularExpression; query parameter; method) sends to its backend, and across rules the
/// most specific match wins, whatever the file's order; a request to `catalog:8080` that no rule
/// matches is answered 404 `NR` and reaches no one, while on the Service's other port, which the
/// route does not name, it goes to the Service's own pods.
#[test]
fn every_match_kind_picks_its_backend_the_most_specific_wins_and_the_rest_is_404() {
    let mut mesh = Mesh::new();
    // catalog itself: ports 8080 (the route's) and 9090, one pod serving both.
    let vip = mesh.host("catalog");
    let pod = mesh.pod("catalog-0", &[PORT, 9090], &[]);
    mesh.config
        .write(
            "service-catalog.yml",
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: catalog, namespace: default}}\n\
                 spec:\n  clusterIP: {vip}\n  selector: {{app: catalog}}\n  ports:\n\
                 \x20 - {{name: http, port: 8080, targetPort: 8080}}\n\
                 \x20 - {{name: http-admin, port: 9090, targetPort: 9090}}\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata:\n  name: catalog-1\n  namespace: default\n\
                 \x20 labels: {{kubernetes.io/service-name: catalog}}\n\
                 addressType: IPv4\n\
                 ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: http-admin, port: 9090, protocol: TCP}}]\n\
                 endpoints:\n\
                 - addresses: [{ip}]\n  conditions: {{ready: true}}\n\
                 \x20 targetRef: {{kind: Pod, name: catalog-0, namespace: default}}\n\
                 ---\napiVersion: v1\nkind: Pod\n\
                 metadata: {{name: catalog-0, namespace: default, labels: {{app: catalog}}}}\n\
                 spec: {{serviceAccountName: catalog}}\nstatus: {{podIP: {ip}}}\n",
                ip = pod.ip()
            ),
        )
        .unwrap();
    mesh.services(&[
        "catalog-v1",
        "catalog-v2",
        "catalog-admin",
        "catalog-search",
    ]);
    mesh.example("matching.yml");
    let agent = mesh.agent();

    let c = "http://catalog:8080";
    let v2 = ["--header", "x-catalog-version: 2"];
    let post = ["--method", "POST"];
    // (what, url, extra arguments, the server expected to answer, or None for the route's 404)
    #[rustfmt::skip]
    let cases: Vec<(&str, String, Vec<&str>, Option<&str>)> = vec![
        // PathPrefix /products, by whole path elements.
        ("prefix", format!("{c}/products/42"), vec![], Some("catalog-v1-0")),
        ("prefix, trailing slash", format!("{c}/products/"), vec![], Some("catalog-v1-0")),
        ("prefix is whole elements", format!("{c}/productsx"), vec![], None),
        // Exact /products (written after the prefix) wins over the prefix, and over the
        // method rule: the path is ranked first.
        ("exact beats prefix", format!("{c}/products"), vec![], Some("catalog-v2-0")),
        ("exact beats method", format!("{c}/products"), post.to_vec(), Some("catalog-v2-0")),
        ("exact ignores the query", format!("{c}/products?page=2"), vec![], Some("catalog-v2-0")),
        // A header regex (a full match) or a query parameter (exact, case-sensitive name).
        ("header regex", format!("{c}/products/42"), v2.to_vec(), Some("catalog-v2-0")),
        ("header regex, dotted", format!("{c}/products/42"),
            vec!["--header", "x-catalog-version: 2.1"], Some("catalog-v2-0")),
        ("header name is case-insensitive", format!("{c}/products/42"),
            vec!["--header", "X-Catalog-Version: 2"], Some("catalog-v2-0")),
        ("header regex is anchored", format!("{c}/products/42"),
            vec!["--header", "x-catalog-version: 20"], Some("catalog-v1-0")),
        ("query exact", format!("{c}/products/42?version=2"), vec![], Some("catalog-v2-0")),
        ("query value differs", format!("{c}/products/42?version=20"), vec![], Some("catalog-v1-0")),
        ("query name is case-sensitive", format!("{c}/products/42?Version=2"), vec![],
            Some("catalog-v1-0")),
        // A method match ranks above header matches at the same path.
        ("method", format!("{c}/products/42"), post.to_vec(), Some("catalog-admin-0")),
        ("method beats header", format!("{c}/products/42"), [&post[..], &v2[..]].concat(),
            Some("catalog-admin-0")),
        ("other method", format!("{c}/products/42"), vec!["--method", "PUT"], Some("catalog-v1-0")),
        // The longer prefix ranks above the shorter one, whatever else the shorter one asks.
        ("longer prefix", format!("{c}/products/search?q=shoes"), vec![], Some("catalog-search-0")),
        ("longer prefix beats header", format!("{c}/products/search"), v2.to_vec(),
            Some("catalog-search-0")),
        ("longer prefix beats method", format!("{c}/products/search"), post.to_vec(),
            Some("catalog-search-0")),
        // RegularExpression: a full match, ranked below any prefix.
        ("path regex", format!("{c}/sku/ABC-1234"), vec![], Some("catalog-search-0")),
        ("path regex is case-sensitive", format!("{c}/sku/abc-1234"), vec![], None),
        ("path regex is anchored", format!("{c}/sku/ABC-1234/reviews"), vec![], None),
        // A match without a path is PathPrefix /: it takes what nothing longer does.
        ("header only", format!("{c}/anything"), vec!["--header", "x-search: true"],
            Some("catalog-search-0")),
        ("header only loses to a prefix", format!("{c}/products/42"),
            vec!["--header", "x-search: true"], Some("catalog-v1-0")),
        ("header value differs", format!("{c}/anything"), vec!["--header", "x-search: false"], None),
        // Nothing matches on the route's port: 404, never the Service's own pods.
        ("no match", format!("{c}/"), vec![], None),
        ("no match, POST", format!("{c}/orders"), post.to_vec(), None),
        // The route names port 8080: on 9090 the Service's own pods answer everything.
        ("other port", "http://catalog:9090/orders".into(), vec![], Some("catalog-0:9090")),
        ("other port, a route's path", "http://catalog:9090/products/42".into(), vec![],
            Some("catalog-0:9090")),
    ];
    // All at once: every client its own process and connection.
    let started = Instant::now();
    let clients: Vec<PodProcess> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, url, args, _))| {
            let id = format!("x-request-id: case-{i}");
            let mut all = vec!["--url", url.as_str(), "--header", &id];
            all.extend(args);
            mesh.spawn_get(&all)
        })
        .collect();
    let mut wrong = Vec::new();
    for ((name, url, args, expected), client) in cases.iter().zip(clients) {
        let (lines, _) = Mesh::finish_get(client);
        let line = &lines[0];
        let served_by = &line["headers"]["x-served-by"];
        let ok = match expected {
            Some(server) => line["status"] == 200 && served_by == *server,
            None => {
                line["status"] == 404
                    && line["body"] == "no route"
                    && line["headers"]["x-mesh-response-flags"] == "NR"
                    && served_by.is_null()
            }
        };
        if !ok {
            wrong.push(format!(
                "{name}: {url} {args:?} answered {} {} by {served_by}, expected {}",
                line["status"],
                line["body"],
                expected.map_or("404 NR".into(), |s| format!("200 by {s}"))
            ));
        }
    }
    println!("{} cases in {:?}", cases.len(), started.elapsed());
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // A 404 reached no one: catalog's pod on 8080 saw nothing at all, and the agent logged
    // each with `NR` and no attempt.
    assert!(mesh.received("catalog-0", "/").is_empty());
    let records = agent
        .wait_for_records(cases.len(), |r| r["kind"] == "http", TIMEOUT)
        .unwrap();
    for (i, (name, _, _, expected)) in cases.iter().enumerate() {
        let id = format!("case-{i}");
        let record = records
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no record of {name} ({id})"));
        if expected.is_none() {
            assert_eq!(record["status"], 404, "{name}: {record}");
            assert_eq!(record["response_flags"], "NR", "{name}: {record}");
            assert_eq!(record["attempts"], 0, "{name}: {record}");
        }
    }

    // The route is the dialled Service's whatever the Host says: GAMMA picks it by the
    // Service's address, not by Host (conformance test MeshFrontendHostname).
    for host in ["catalog-v2:8080", "shop.example"] {
        let header = format!("host: {host}");
        let line = mesh.one(&format!("{c}/products/42"), &["--header", &header]);
        assert_eq!(
            (&line["status"], &line["headers"]["x-served-by"]),
            (&Value::from(200), &Value::from("catalog-v1-0")),
            "Host {host} to catalog:8080/products/42: {line}"
        );
    }
}

// --------------------------------------------------------------------------------- headers

/// `headers.yml`: the rule's RequestHeaderModifier sets, appends to and removes what the
/// backends receive, its ResponseHeaderModifier what the client gets; each backend's own
/// filters apply to it alone. The two backends share the requests evenly (weights 1 and 1).
#[test]
fn header_modifiers_of_the_rule_reach_every_backend_and_a_backends_only_its_own() {
    let mut mesh = Mesh::new();
    mesh.services(&["accounts", "accounts-v1", "accounts-v2"]);
    mesh.example("headers.yml");
    let _agent = mesh.agent();

    let (lines, summary) = mesh.get(&[
        "--url",
        "http://accounts:8080/me/headers",
        "--count",
        "10",
        "--header",
        "x-mesh-route: spoofed",
        "--header",
        "x-tenant: acme",
        "--header",
        "x-internal-debug: 1",
    ]);
    assert_eq!(summary["errors"], 0, "{summary}");
    let mut served = BTreeMap::<String, u32>::new();
    for line in &lines {
        let received = echoed(line);
        // The rule's request filter, on every backend: set replaces, add appends, remove.
        assert_eq!(received["x-mesh-route"], "accounts", "{received}");
        assert_eq!(received["x-tenant"], "acme, mesh", "{received}");
        assert!(received.get("x-internal-debug").is_none(), "{received}");
        assert_eq!(received[":path"], "/me/headers", "{received}");
        assert_eq!(received["host"], "accounts:8080", "{received}");
        // The rule's response filter, on every answer.
        let headers = &line["headers"];
        assert_eq!(headers["cache-control"], "no-store", "{line}");
        assert_eq!(headers["x-frame-options"], "DENY", "{line}");
        assert!(headers.get("server").is_none(), "{line}");
        // Each backend's own filter, on that backend only.
        let by = headers["x-served-by"].as_str().unwrap_or_default();
        match by {
            "accounts-v1-0" => {
                assert_eq!(received["x-backend"], "v1", "{received}");
                assert!(headers.get("x-canary").is_none(), "{line}");
            }
            "accounts-v2-0" => {
                assert!(received.get("x-backend").is_none(), "{received}");
                assert_eq!(headers["x-canary"], "true", "{line}");
            }
            other => panic!("served by {other:?}: {line}"),
        }
        *served.entry(by.to_owned()).or_default() += 1;
    }
    assert_eq!(served["accounts-v1-0"], 5, "{served:?}");
    assert_eq!(served["accounts-v2-0"], 5, "{served:?}");
    // The route sends to the versions, never to accounts' own pod.
    assert!(mesh.received("accounts-0", "/").is_empty());
}

// --------------------------------------------------------------------------------- rewrite

/// `rewrite.yml`: ReplacePrefixMatch swaps the matched prefix (by whole path elements) and
/// keeps the rest and the query; `hostname` is the `Host` the backend sees; ReplaceFullPath
/// replaces the whole path of a prefix match; a rule without URLRewrite changes nothing.
#[test]
fn url_rewrites_replace_the_prefix_the_whole_path_and_the_host_the_backend_sees() {
    let mut mesh = Mesh::new();
    mesh.services(&["orders", "orders-v2"]);
    mesh.example("rewrite.yml");
    let _agent = mesh.agent();
    let o = "http://orders:8080";
    let rewritten_host = "orders-v2.default.svc.cluster.local";

    // ReplacePrefixMatch with hostname: the rest of the path and the query are kept.
    let received = echoed(&mesh.one(&format!("{o}/api/v1/orders/7/headers?expand=items"), &[]));
    assert_eq!(
        received[":path"], "/api/v2/orders/7/headers?expand=items",
        "{received}"
    );
    assert_eq!(received["host"], rewritten_host, "{received}");
    // The prefix alone becomes the replacement alone; a trailing slash stays.
    for (path, id, want) in [
        ("/api/v1", "bare", "/api/v2"),
        ("/api/v1/", "slash", "/api/v2/"),
    ] {
        let header = format!("x-request-id: {id}");
        let line = mesh.one(&format!("{o}{path}"), &["--header", &header]);
        assert_eq!(line["status"], 200, "{path}: {line}");
        let logged = mesh.received("orders-v2-0", "/api/v2");
        let got: Vec<&Value> = logged.iter().filter(|r| r["request_id"] == id).collect();
        assert_eq!(got.len(), 1, "{path}: {logged:?}");
        assert_eq!(got[0]["path"], want, "{path}: {}", got[0]);
        assert_eq!(got[0]["host"], rewritten_host, "{path}: {}", got[0]);
    }
    // `/api/v1x` is not under the prefix `/api/v1`: the last rule takes it, unchanged.
    let received = echoed(&mesh.one(&format!("{o}/api/v1x/headers"), &[]));
    assert_eq!(received[":path"], "/api/v1x/headers", "{received}");
    assert_eq!(received["host"], "orders:8080", "{received}");

    // ReplaceFullPath on a prefix match: any path under /healthz is /health (the upstream
    // answers `UP` there alone); the query is kept, the Host is not touched.
    for (path, id) in [
        ("/healthz", "full-1"),
        ("/healthz/ready?verbose=1", "full-2"),
    ] {
        let header = format!("x-request-id: {id}");
        let line = mesh.one(&format!("{o}{path}"), &["--header", &header]);
        assert_eq!(line["status"], 200, "{path}: {line}");
        assert_eq!(line["body"], "UP", "{path}: {line}");
        assert_eq!(line["headers"]["x-served-by"], "orders-v2-0", "{line}");
    }
    let health = mesh.received("orders-v2-0", "/health");
    let by_id = |id: &str| {
        health
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no request {id}: {health:?}"))
    };
    assert_eq!(by_id("full-1")["path"], "/health");
    assert_eq!(by_id("full-2")["path"], "/health?verbose=1");
    assert_eq!(by_id("full-2")["host"], "orders:8080");

    // HTTP/2: the rewritten host is the `:authority` the backend sees.
    let received = echoed(&mesh.one(&format!("{o}/api/v1/orders/headers"), &["--h2"]));
    assert_eq!(received[":path"], "/api/v2/orders/headers", "{received}");
    assert_eq!(received[":version"], "HTTP/2.0", "{received}");
    assert_eq!(received[":authority"], rewritten_host, "{received}");
    assert!(received.get("host").is_none(), "{received}");

    // No URLRewrite: path and Host as the client sent them.
    let received = echoed(&mesh.one(&format!("{o}/other/headers"), &[]));
    assert_eq!(received[":path"], "/other/headers", "{received}");
    assert_eq!(received["host"], "orders:8080", "{received}");
    assert!(mesh.received("orders-0", "/").is_empty());
}

// -------------------------------------------------------------------------------- redirect

/// `redirect.yml`: the agent answers each redirect itself — status, `Location` built from the
/// request with the filter's scheme, hostname, port and path, the query kept, an empty body —
/// and no backend hears of it; other requests reach `web`.
#[test]
fn redirects_are_answered_by_the_agent_with_their_status_and_location() {
    let mut mesh = Mesh::new();
    mesh.service("web", &[]);
    mesh.example("redirect.yml");
    let agent = mesh.agent();
    let w = "http://web:8080";

    #[rustfmt::skip]
    let cases: [(&str, &[&str], u16, &str); 8] = [
        // ReplacePrefixMatch, 301: scheme, host and port are the request's.
        ("/old-blog/2024/post?ref=rss", &[], 301, "http://web:8080/blog/2024/post?ref=rss"),
        ("/old-blog", &[], 301, "http://web:8080/blog"),
        // scheme https and hostname: https's default port, left out; 302 by default.
        ("/login", &[], 302, "https://login.example.com/login"),
        ("/login?next=/cart", &["--method", "POST"], 302, "https://login.example.com/login?next=/cart"),
        // hostname, port and ReplaceFullPath, 308.
        ("/manual/ch1/intro.html", &[], 308, "http://docs.example.com:8443/handbook"),
        ("/manual?lang=en", &[], 308, "http://docs.example.com:8443/handbook?lang=en"),
        // The Host the client sent (not the address it dialled) is the one redirected to.
        ("/old-blog/x", &["--header", "host: web.default.svc.cluster.local:8080"], 301,
            "http://web.default.svc.cluster.local:8080/blog/x"),
        // HTTP/2: from `:authority` and `:scheme`.
        ("/old-blog/h2", &["--h2"], 301, "http://web:8080/blog/h2"),
    ];
    for (path, args, status, location) in cases {
        let line = mesh.one(&format!("{w}{path}"), args);
        assert_eq!(line["status"], status, "{path}: {line}");
        assert_eq!(line["headers"]["location"], location, "{path}: {line}");
        assert_eq!(line["body"], "", "{path}: {line}");
        assert!(
            line["headers"].get("x-served-by").is_none(),
            "{path}: {line}"
        );
    }
    // Not redirected: `/old-bloggers` is not under `/old-blog`; `/login/help` is not `/login`.
    for path in ["/old-bloggers", "/login/help", "/index.html"] {
        let line = mesh.one(&format!("{w}{path}"), &[]);
        assert_eq!(line["status"], 200, "{path}: {line}");
        assert_eq!(line["headers"]["x-served-by"], "web-0", "{path}: {line}");
        assert!(line["headers"].get("location").is_none(), "{path}: {line}");
    }
    // No backend heard of a redirected request; the agent logged each, without an attempt.
    let received: Vec<Value> = mesh.received("web-0", "/");
    let paths: Vec<&str> = received.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["/old-bloggers", "/login/help", "/index.html"],
        "{received:?}"
    );
    for (prefix, n, status) in [
        ("/old-blog", 3, 301),
        ("/login", 2, 302),
        ("/manual", 2, 308),
    ] {
        let records = agent
            .wait_for_records(
                n,
                |r| r["kind"] == "http" && starts_with(&r["path"], prefix) && r["status"] != 200,
                TIMEOUT,
            )
            .unwrap();
        for record in &records {
            assert_eq!(record["status"], status, "{record}");
            assert_eq!(record["attempts"], 0, "{record}");
            assert_eq!(record["response_flags"], "-", "{record}");
        }
    }

    // A Host without a port: the port is still the one the request came to, the Service's.
    // The Gateway API: "If redirect scheme is empty, the redirect port MUST be the Gateway
    // Listener port" (here the Service port the route is attached to).
    let line = mesh.one(&format!("{w}/old-blog/y"), &["--header", "host: web"]);
    assert_eq!(line["status"], 301, "{line}");
    assert_eq!(
        line["headers"]["location"], "http://web:8080/blog/y",
        "{line}"
    );
}

// ---------------------------------------------------------------------------------- mirror

/// How long the mirror backend holds every answer: far longer than any client request may take.
const MIRROR_DELAY_MS: u64 = 5000;

/// `mirror.yml`: payments-v1 answers every request; payments-v2 receives copies of exactly the
/// share each rule says (a fraction 1/4, a percent 50, all without either), with Envoy's
/// `-shadow` host suffix and the request's id; a client never waits for a copy, though the
/// mirror here answers only after 5 s.
#[test]
fn request_mirrors_copy_exactly_their_share_and_the_client_never_waits_for_them() {
    let mut mesh = Mesh::new();
    mesh.services(&["payments", "payments-v1"]);
    let delay = MIRROR_DELAY_MS.to_string();
    mesh.service("payments-v2", &["--delay-ms", &delay]);
    mesh.example("mirror.yml");
    let _agent = mesh.agent();

    let started = Instant::now();
    // (path, requests, copies)
    let shares = [
        ("/charges", 40, 10),
        ("/refunds", 20, 10),
        ("/history", 10, 10),
    ];
    for (path, n, _) in shares {
        let url = format!("http://payments:8080{path}");
        let prefix = format!("mirror{}", path.replace('/', "-"));
        let (lines, summary) = mesh.get(&[
            "--url",
            &url,
            "--count",
            &n.to_string(),
            "--concurrency",
            "4",
            "--request-ids",
            &prefix,
        ]);
        assert_eq!(
            count(&summary, "by_body", "payments-v1-0"),
            n as u64,
            "{path}: {summary}"
        );
        for line in &lines {
            assert!(
                elapsed_ms(line) < MIRROR_DELAY_MS as f64 / 2.0,
                "a client waited for the mirror: {line}"
            );
        }
    }
    let took = started.elapsed();
    println!("70 requests in {took:?}, with a mirror answering after {delay} ms");
    assert!(took < Duration::from_millis(MIRROR_DELAY_MS), "{took:?}");

    for (path, n, copies) in shares {
        let mirrored = mesh.wait_received("payments-v2-0", path, copies, Duration::ZERO);
        let primaries = mesh.received("payments-v1-0", path);
        assert_eq!(primaries.len(), n, "{path}: {primaries:?}");
        for copy in &mirrored {
            assert_eq!(copy["host"], "payments-shadow:8080", "{copy}");
            assert_eq!(copy["method"], "GET", "{copy}");
            let id = &copy["request_id"];
            assert!(
                primaries.iter().any(|p| p["request_id"] == *id),
                "a copy of no request: {copy}"
            );
        }
    }
    // Exactly the share, no more, once any copy still on its way has had time to arrive.
    std::thread::sleep(Duration::from_millis(300));
    for (path, _, copies) in shares {
        assert_eq!(
            mesh.received("payments-v2-0", path).len(),
            copies,
            "copies of {path}"
        );
    }
    assert!(mesh.received("payments-0", "/").is_empty());
}

// -------------------------------------------------------------------------------- timeouts

/// `timeouts.yml`: `request` ends a whole request with 504 `UT` once it has passed;
/// `backendRequest` bounds a try at the backend, well before the rule's `request`; requests
/// within the bounds are answered.
#[test]
fn request_and_backend_request_timeouts_answer_504_in_time() {
    let mut mesh = Mesh::new();
    mesh.service("reports", &[]);
    mesh.example("timeouts.yml");
    let agent = mesh.agent();
    let r = "http://reports:8080";

    // `/dashboard`: request 500ms. The upstream would take 10 s.
    let dashboard = mesh.spawn_get(&[
        "--url",
        &format!("{r}/dashboard?delay_ms=10000"),
        "--header",
        "x-request-id: dashboard-slow",
    ]);
    // The other rule: request 10s, backendRequest 1s.
    let export = mesh.spawn_get(&[
        "--url",
        &format!("{r}/exports/q3?delay_ms=10000"),
        "--header",
        "x-request-id: export-slow",
    ]);
    for (client, bound, path) in [
        (dashboard, 500.0, "/dashboard"),
        (export, 1000.0, "/exports/q3"),
    ] {
        let (lines, _) = Mesh::finish_get(client);
        let line = &lines[0];
        assert_eq!(line["status"], 504, "{path}: {line}");
        assert_eq!(line["body"], "upstream request timeout", "{line}");
        assert_eq!(line["headers"]["x-mesh-response-flags"], "UT", "{line}");
        let took = elapsed_ms(line);
        assert!(
            (bound..bound + 2000.0).contains(&took),
            "{path} answered after {took} ms, its bound being {bound} ms"
        );
        let record = &logged(&agent, path, 1)[0];
        assert_eq!(record["status"], 504, "{record}");
        assert_eq!(record["response_flags"], "UT", "{record}");
        // Istio's default retry conditions do not retry a timed-out try.
        assert_eq!(record["attempts"], 1, "{record}");
        assert_eq!(mesh.received("reports-0", path).len(), 1, "tried once");
    }

    // Within the bounds: answered.
    for (path, id) in [
        ("/dashboard/sales?delay_ms=100", "dashboard-quick"),
        ("/exports/q4?delay_ms=600", "export-quick"),
    ] {
        let header = format!("x-request-id: {id}");
        let line = mesh.one(&format!("{r}{path}"), &["--header", &header]);
        assert_eq!(line["status"], 200, "{path}: {line}");
        assert_eq!(line["body"], "reports-0", "{path}: {line}");
    }
}

// ----------------------------------------------------------------------------------- split

/// A second route for `checkout`, written by the test (its rules warn, so it is no example):
/// a rule without backends and one whose only backend weighs 0 both answer 500; a rule with a
/// filter this mesh lacks (CORS) is left out, so its requests go to the next rule that matches
/// (`split.yml`'s), never to its backend.
const RETIRED: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: checkout-retired
spec:
  parentRefs:
  - {group: \"\", kind: Service, name: checkout, port: 8080}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /legacy}
  - matches:
    - path: {type: PathPrefix, value: /retired}
    backendRefs:
    - {name: checkout-v1, port: 8080, weight: 0}
  - matches:
    - path: {type: PathPrefix, value: /widget}
    filters:
    - {type: CORS, cors: {allowOrigins: [\"https://shop.example\"]}}
    backendRefs:
    - {name: checkout-v3, port: 8080}
";

/// `split.yml`: weights 3, 1 and 0 send exactly 75 and 25 of 100 requests to v1 and v2 and
/// none to v3; weights left out are 1 each (exactly half each). With a second route merged in,
/// a rule without backends answers 500, from the agent itself, and a rule with an unsupported
/// filter is left out.
#[test]
fn weights_split_exactly_zero_sends_nothing_and_no_backend_is_500() {
    let mut mesh = Mesh::new();
    mesh.services(&["checkout", "checkout-v1", "checkout-v2", "checkout-v3"]);
    mesh.example("split.yml");
    mesh.config.write("checkout-retired.yml", RETIRED).unwrap();
    let agent = mesh.agent();

    // The split is a smooth weighted round robin: exact over any whole number of periods.
    for (path, n, shares) in [("/cart", 100, [75, 25, 0]), ("/beta/cart", 20, [0, 10, 10])] {
        let url = format!("http://checkout:8080{path}");
        let (_, summary) = mesh.get(&[
            "--url",
            &url,
            "--count",
            &n.to_string(),
            "--concurrency",
            "4",
            "--quiet",
        ]);
        assert_eq!(count(&summary, "by_status", "200"), n, "{path}: {summary}");
        for (version, share) in ["checkout-v1-0", "checkout-v2-0", "checkout-v3-0"]
            .into_iter()
            .zip(shares)
        {
            assert_eq!(
                count(&summary, "by_body", version),
                share,
                "{path}, {version}: {summary}"
            );
            assert_eq!(
                mesh.received(version, path).len() as u64,
                share,
                "{version}"
            );
        }
    }
    assert!(mesh.received("checkout-0", "/").is_empty());

    // No backend to send to: 500 with an empty body, answered by the agent, nothing tried.
    for path in ["/legacy/cart", "/retired"] {
        let line = mesh.one(&format!("http://checkout:8080{path}"), &[]);
        assert_eq!(line["status"], 500, "{path}: {line}");
        assert_eq!(line["body"], "", "{path}: {line}");
        assert!(
            line["headers"].get("x-served-by").is_none(),
            "{path}: {line}"
        );
        let record = &logged(&agent, path, 1)[0];
        assert_eq!(record["status"], 500, "{record}");
        assert_eq!(record["attempts"], 0, "{record}");
    }
    // The rule whose filter is not supported is not used, not even without its filter: its
    // requests are split.yml's catch-all's, and its backend sees none.
    let (_, summary) = mesh.get(&[
        "--url",
        "http://checkout:8080/widget",
        "--count",
        "8",
        "--quiet",
    ]);
    assert_eq!(count(&summary, "by_status", "200"), 8, "{summary}");
    assert_eq!(
        count(&summary, "by_body", "checkout-v1-0") + count(&summary, "by_body", "checkout-v2-0"),
        8,
        "{summary}"
    );
    assert!(mesh.received("checkout-v3-0", "/widget").is_empty());
    for version in ["checkout-v1-0", "checkout-v2-0", "checkout-v3-0"] {
        for path in ["/legacy", "/retired"] {
            assert!(mesh.received(version, path).is_empty(), "{version}: {path}");
        }
    }
    // Each rule of that route is warned about, by file, object and field.
    let log = agent.stderr_text();
    for field in [
        "spec.rules[0].backendRefs",
        "spec.rules[1].backendRefs",
        "spec.rules[2].filters[0].type",
    ] {
        assert!(
            log.lines()
                .any(|line| line.contains("checkout-retired") && line.contains(field)),
            "no warning about {field}:\n{log}"
        );
    }
}

/// `ingress.yml`, the tutorial's ingress as a Gateway API Gateway (class `istio`) and an
/// HTTPRoute attached to it: the agent's ingress serves it on port 80, sends `/service-a/...`
/// to service-a with the prefix taken off, for any Host, and answers 404 `NR` to what no
/// route of the gateway matches.
#[test]
fn a_gateway_api_gateway_is_served_by_the_ingress_with_its_routes() {
    let mut mesh = Mesh::new();
    mesh.services(&["service-a"]);
    mesh.example("ingress.yml");
    let _agent = mesh.agent_with(&["--ingress", "127.0.0.1:80"]);
    let ingress: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
    let get = |path: &str| {
        mesh.node
            .run_on_node(|| mesh_tests::http::request(ingress, "GET", path, &[], ""))
            .unwrap()
            .unwrap()
    };
    let (status, body) = get("/service-a/hello?x=1");
    assert_eq!(status, 200, "{body}");
    let received = mesh.wait_received("service-a-0", "/hello", 1, Duration::ZERO);
    assert_eq!(received[0]["path"], "/hello?x=1", "{received:?}");
    let (status, _) = get("/service-a");
    assert_eq!(status, 200);
    assert_eq!(
        mesh.wait_received("service-a-0", "/", 2, Duration::ZERO)
            .len(),
        2
    );
    let (status, body) = get("/other");
    assert_eq!(status, 404, "{body}");
}

// ------------------------------------------------------------------------------------ grpc

impl Mesh {
    /// Runs `upstream grpc <args>` in the client pod — unary gRPC calls: h2c POSTs with
    /// `content-type: application/grpc`, `te: trailers` and one framed message, whose reply
    /// message is the server's name — one line per reply, then the summary.
    fn grpc(&self, args: &[&str]) -> (Vec<Value>, Value) {
        let mut command = Command::new(UPSTREAM);
        command.arg("grpc").args(args);
        Mesh::finish_get(self.node.spawn_in_pod(&self.client, command).unwrap())
    }
}

/// `grpc.yml`: a GRPCRoute picks its backend by the call's service and method, the most
/// specific match first whatever the rules' order: exact method and header to the canary, the
/// service's other calls split exactly 3:1 with the header the rule sets, a method of any other
/// service to its own backend; a call no rule matches is answered 404 `NR` by the agent (an
/// HTTP status, not mapped to a gRPC one) and reaches no one.
#[test]
fn grpc_routes_pick_their_backend_by_service_and_method() {
    let mut mesh = Mesh::new();
    mesh.services(&[
        "greeter",
        "greeter-v1",
        "greeter-v2",
        "greeter-canary",
        "greeter-legacy",
    ]);
    mesh.example("grpc.yml");
    let agent = mesh.agent();
    let g = "http://greeter:8080";
    let started = Instant::now();

    // The service-only rule: a smooth weighted round robin, exact over whole periods of 4, so
    // every batch (a multiple of 4, the batches one after the other) splits exactly 3:1. Real
    // gRPC calls: each answered `grpc-status: 0` in the trailers, through the proxy.
    #[rustfmt::skip]
    let batches: [(&str, &[&str], u64); 3] = [
        // SayHello without the canary's header is the service's, not the canary's.
        ("/helloworld.Greeter/SayHello", &[], 40),
        ("/helloworld.Greeter/SayHello", &["--header", "x-canary: false"], 8),
        ("/helloworld.Greeter/SayGoodbye", &[], 40),
    ];
    for (path, args, n) in batches {
        let url = format!("{g}{path}");
        let n_arg = n.to_string();
        let mut all = vec![
            "--url",
            &url,
            "--count",
            &n_arg,
            "--concurrency",
            "4",
            "--quiet",
        ];
        all.extend(args);
        let (_, summary) = mesh.grpc(&all);
        assert_eq!(count(&summary, "by_status", "200"), n, "{path}: {summary}");
        assert_eq!(
            count(&summary, "by_grpc_status", "0"),
            n,
            "{path}: {summary}"
        );
        for (server, share) in [("greeter-v1-0", n / 4 * 3), ("greeter-v2-0", n / 4)] {
            assert_eq!(
                count(&summary, "by_body", server),
                share,
                "{path} {args:?}, {server}: {summary}"
            );
        }
    }
    for (server, share) in [("greeter-v1-0", 66), ("greeter-v2-0", 22)] {
        let received = mesh.received(server, "/helloworld.Greeter/");
        assert_eq!(received.len(), share, "{server}: {received:?}");
        for request in &received {
            assert_eq!(request["method"], "POST", "{request}");
        }
    }

    // One call each. `upstream get --h2 --method POST` with gRPC's content type: the server
    // answers it as a gRPC call, and the client shows the response headers (`x-served-by`,
    // the agent's `x-mesh-response-flags`). Its request body is empty, not a framed message:
    // the agent routes by path and headers, which is all this proves.
    let grpc = [
        "--h2",
        "--method",
        "POST",
        "--header",
        "content-type: application/grpc",
    ];
    let canary = ["--header", "x-canary: true"];
    // (what, path, extra arguments, the server expected to answer, or None for the 404)
    #[rustfmt::skip]
    let cases: [(&str, &str, &[&str], Option<&str>); 8] = [
        ("exact method and header", "/helloworld.Greeter/SayHello", &canary,
            Some("greeter-canary-0")),
        ("method only", "/other.Service/SayHello", &[], Some("greeter-legacy-0")),
        ("method only, the canary's header elsewhere", "/other.Service/SayHello", &canary,
            Some("greeter-legacy-0")),
        // The service is whole: `helloworld.Greeter.v2` is another service.
        ("another service, same prefix", "/helloworld.Greeter.v2/SayHello", &[],
            Some("greeter-legacy-0")),
        ("another service, other method", "/helloworld.Greeter.v2/SayGoodbye", &[], None),
        ("no rule", "/other.Service/Other", &[], None),
        ("no rule, with the canary's header", "/other.Service/Other", &canary, None),
        // Method names are case-sensitive.
        ("method case", "/other.Service/sayHello", &[], None),
    ];
    let mut wrong = Vec::new();
    for (i, (name, path, args, expected)) in cases.iter().enumerate() {
        let id = format!("x-request-id: grpc-case-{i}");
        let all = [&grpc[..], &["--header", &id], args].concat();
        let line = mesh.one(&format!("{g}{path}"), &all);
        let served_by = &line["headers"]["x-served-by"];
        let ok = line["version"] == "HTTP/2.0"
            && match expected {
                Some(server) => {
                    line["status"] == 200
                        && served_by == *server
                        && line["headers"]["content-type"] == "application/grpc"
                }
                None => {
                    line["status"] == 404
                        && line["body"] == "no route"
                        && line["headers"]["x-mesh-response-flags"] == "NR"
                        && served_by.is_null()
                }
            };
        if !ok {
            wrong.push(format!(
                "{name}: {path} {args:?} answered {} {:?} by {served_by} ({}), expected {}",
                line["status"],
                line["body"],
                line["version"],
                expected.map_or("404 NR".into(), |s| format!("200 by {s}"))
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The canary saw its one call; nothing reached the Service's own pod; each 404 was the
    // agent's, without an attempt.
    let canary_calls = mesh.received("greeter-canary-0", "/");
    assert_eq!(canary_calls.len(), 1, "{canary_calls:?}");
    assert_eq!(canary_calls[0]["request_id"], "grpc-case-0");
    assert!(mesh.received("greeter-0", "/").is_empty());
    let records = agent
        .wait_for_records(
            cases.len(),
            |r| r["kind"] == "http" && starts_with(&r["request_id"], "grpc-case-"),
            TIMEOUT,
        )
        .unwrap();
    for (i, (name, _, _, expected)) in cases.iter().enumerate() {
        let id = format!("grpc-case-{i}");
        let record = records
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no record of {name} ({id})"));
        if expected.is_none() {
            assert_eq!(record["status"], 404, "{name}: {record}");
            assert_eq!(record["response_flags"], "NR", "{name}: {record}");
            assert_eq!(record["attempts"], 0, "{name}: {record}");
        }
    }

    // The header the service rule's RequestHeaderModifier sets (replacing the client's) reached
    // the backend. The upstream echoes what it received only for a request that is not gRPC at
    // a path ending in `/headers`, so this one POST leaves the content type out; its path is
    // still the service's.
    let line = mesh.one(
        &format!("{g}/helloworld.Greeter/headers"),
        &[
            "--h2",
            "--method",
            "POST",
            "--header",
            "x-grpc-route: spoofed",
        ],
    );
    let received = echoed(&line);
    assert_eq!(received["x-grpc-route"], "greeter", "{received}");
    assert_eq!(
        received[":path"], "/helloworld.Greeter/headers",
        "{received}"
    );
    assert_eq!(received[":version"], "HTTP/2.0", "{received}");
    assert!(
        ["greeter-v1-0", "greeter-v2-0"]
            .contains(&line["headers"]["x-served-by"].as_str().unwrap_or("")),
        "{line}"
    );
    println!("gRPC routes checked in {:?}", started.elapsed());
}

/// `consumer.yml`: a producer route for `orders` (namespace default) and a consumer route for
/// it in namespace `frontend`. A client in default reaches orders-v1 on every path; a client in
/// frontend reaches orders-v2 on `/api` and gets 404 `NR` elsewhere (its namespace's routes
/// take the Service whole for it), never the producer's orders-v1.
#[test]
fn a_consumer_route_routes_its_namespaces_clients_alone() {
    let mut mesh = Mesh::new();
    mesh.services(&["orders", "orders-v1", "orders-v2"]);
    mesh.example("consumer.yml");
    let agent = mesh.agent();
    let frontend = mesh.node.add_pod("frontend-client").unwrap();
    let enroll = serde_json::json!({
        "name": "frontend-client",
        "namespace": "frontend",
        "netns": frontend.netns_path(),
    });
    let (status, body) = agent
        .admin_request("POST", "/pods", &enroll.to_string())
        .unwrap();
    assert!((200..300).contains(&status), "{status} {body}");

    let from = |pod: &Pod, path: &str| {
        let mut command = Command::new(UPSTREAM);
        command.args(["get", "--url", &format!("http://orders:8080{path}")]);
        let (mut lines, _) = Mesh::finish_get(mesh.node.spawn_in_pod(pod, command).unwrap());
        let line = lines.remove(0);
        let served_by = line["headers"]["x-served-by"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        (line["status"].as_u64().unwrap_or(0), served_by, line)
    };
    for path in ["/api/list", "/other"] {
        let (status, served_by, line) = from(&mesh.client, path);
        assert_eq!(
            (status, served_by.as_str()),
            (200, "orders-v1-0"),
            "{path}: {line}"
        );
    }
    let (status, served_by, line) = from(&frontend, "/api/list");
    assert_eq!((status, served_by.as_str()), (200, "orders-v2-0"), "{line}");
    let (status, _, line) = from(&frontend, "/other");
    assert_eq!(status, 404, "{line}");
    assert!(
        mesh.received("orders-v1-0", "/other").len() == 1,
        "only the default client's"
    );
}
