//! The tutorial, replayed in order with the real demo apps (Python → Deno → Java), measuring
//! what the tutorial shows at each step: once in local mode on a simulated node, once in
//! Kubernetes mode with a real control plane, the kubelet stand-in and kubectl doing every
//! change. `cargo xtask test` runs them one after the other (`--test-threads 1`): both measure
//! timings that a second tutorial on this 2-core machine would skew.

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

use mesh_tests::agent::sum_samples;
use mesh_tests::capture::Capture;
use mesh_tests::graph_page::{Drawn, GraphPage};
use mesh_tests::kiali;
use mesh_tests::mesh_config::examples_dir;
use mesh_tests::prometheus::Prometheus;
use mesh_tests::stat;
use mesh_tests::Agent;

use mesh_tests::tutorial::{
    answer, gateway_api_canary_steps,
    kubernetes::KubernetesTutorial,
    local::{Layout, LocalTutorial},
    steps, Answer, Pace, Step, World,
};

#[test]
fn the_tutorial_end_to_end() {
    // This test runs uncaptured in CI to show its figures; the apps' and agent's own output
    // would drown them.
    mesh_tests::set_echo(false);
    // On a fresh machine starting takes minutes (Deno from npm, perhaps a JDK): say what it does.
    let tutorial =
        LocalTutorial::start(Layout::ONE_NODE, &|line| println!("start: {line}")).unwrap();
    // A real Prometheus scrapes the agent through the replay; Kiali's graph queries find the
    // canary's split and the crashed replica's errors in what it stored.
    let prometheus = Prometheus::start(tutorial.node()).unwrap();
    // `mesh-agent stat` watches the first 5 s of the canary's 90/10 step as it runs, and the
    // agent's graph page is open in a real browser from then on.
    let stat = RefCell::new(None);
    let page = RefCell::new(None);
    let kiali = kiali_checks(&prometheus, "local");
    replay(
        &tutorial,
        "default",
        "local",
        &|step| {
            if step == CANARY_90_10 {
                // The browser first: it takes seconds to start, which stat's window must not
                // spend waiting for the step's traffic.
                *page.borrow_mut() = Some(GraphPage::open(tutorial.node()).unwrap());
                *stat.borrow_mut() = Some(stat::start(tutorial.agent(), 5).unwrap());
            }
        },
        &|step, took| {
            kiali(step, took);
            if let Some(page) = page.borrow().as_ref() {
                graph_page_checks(page, &tutorial, "local", step);
            }
            let Some(running) = stat.borrow_mut().take() else {
                return;
            };
            let table = stat::table(running).unwrap();
            let share = |version| {
                stat::row(&table, "service-c", version)
                    .map(|row| stat::percent(&row[3]))
                    .unwrap_or_else(|| panic!("no service-c {version} in:\n{table}"))
            };
            println!(
                "local mesh-agent stat at 90/10: service-c v1 {}%, v2 {}%",
                share("v1"),
                share("v2")
            );
            assert!((7.0..=13.0).contains(&share("v2")), "{table}");
        },
    );
}

/// What the agent's graph page shows at the end of a step, over its last 10 s (every step
/// checked here lasts longer): at 90/10, the three services and B's calls to C split 90/10 (in
/// mutual TLS between nodes); with the circuit breaker, the crashed replica marked ejected. Each
/// is saved as a screenshot.
fn graph_page_checks(page: &GraphPage, tutorial: &impl World, mode: &str, step: &str) {
    const B: &str = "default/service-b/v1";
    const DRAWN_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);
    let screenshot = |name: &str| {
        let name = match mode {
            "local" => name.to_owned(),
            _ => format!("{mode}-{name}"),
        };
        page.screenshot(&name).unwrap()
    };
    match step {
        CANARY_90_10 => {
            let v2 = |drawn: &Drawn| drawn.share(B, "default/service-c/v2");
            let drawn = page
                .drawn(
                    |drawn| v2(drawn).is_some_and(|share| (7.0..=13.0).contains(&share)),
                    DRAWN_WITHIN,
                )
                .unwrap();
            for service in ["service-a", "service-b", "service-c"] {
                assert!(drawn.services.iter().any(|s| s == service), "{drawn:?}");
            }
            let v1 = drawn.share(B, "default/service-c/v1").unwrap();
            let shot = screenshot("canary-90-10");
            println!(
                "{mode} graph page at 90/10: B→C v1 {v1}%, v2 {}%, drawn {} times ({})",
                v2(&drawn).unwrap(),
                drawn.drawn,
                shot.display()
            );
            assert!((87.0..=93.0).contains(&v1), "{drawn:?}");
            // Open since the step began, it redrew as the split came in (a draw a second).
            assert!(drawn.drawn >= 5, "drawn {} times", drawn.drawn);
            if mode == "three-nodes" {
                let label = |to| drawn.label(B, to).unwrap_or_default();
                for to in ["default/service-c/v1", "default/service-c/v2"] {
                    assert!(label(to).contains("mTLS"), "B → {to}: {drawn:?}");
                }
            }
        }
        CIRCUIT_BREAKER => {
            // The replica is ejected while the step's calls run; once they stop, it returns
            // when its ejection ends (2-4 s after the step here). Should that come first, a few
            // calls find it crashed and eject it again, as they would in the tutorial's loop.
            let ejected = |drawn: &Drawn| drawn.nodes.iter().any(|n| n.ejected > 0);
            let mut tries = 0;
            let drawn = loop {
                match page.drawn(ejected, DRAWN_WITHIN / 4) {
                    Ok(drawn) => break drawn,
                    Err(_) if tries < 3 => {
                        tries += 1;
                        for _ in 0..10 {
                            let _ = tutorial.call();
                        }
                    }
                    Err(error) => panic!("{error:#}"),
                }
            };
            let ejected: Vec<_> = drawn.nodes.iter().filter(|n| n.ejected > 0).collect();
            let shot = screenshot("circuit-breaker");
            println!(
                "{mode} graph page, circuit breaker: {} ({})",
                ejected[0].text,
                shot.display()
            );
            assert_eq!(ejected.len(), 1, "{drawn:?}");
            assert_eq!(ejected[0].id, "default/service-c/v2");
            assert!(ejected[0].text.contains("ejected"), "{drawn:?}");
        }
        _ => {}
    }
}

/// The canary step the observability checks look at.
const CANARY_90_10: &str = "canary 2: 90/10";
/// The step whose outlier detection ejects the crashed replica.
const CIRCUIT_BREAKER: &str = "crashed, circuit breaker";

/// The cluster: A on node 1, B and C v1 on node 2, C v2 on node 3, the agents given a CA,
/// and AuthorizationPolicies that admit exactly the tutorial's call graph
/// (`deploy/examples/security/call-graph.yml`: gateway → A → B → C, C for `GET` only). Every
/// step as on one node, while a capture of the underlay sees only tunnel bytes (port 15008): no
/// plaintext HTTP, no request id; the destination agents report each caller's SPIFFE identity
/// over mutual TLS; no request of the tutorial is denied, none arrives in plaintext (every pod is
/// STRICT), and a call off the graph (A to C) is denied.
/// (Its control follows: the same calls, found in plaintext without `--ca`.)
/// The canary again with the Gateway API: HTTPRoutes attached to `service-c` (GAMMA) split it
/// between `service-c-v1` and `service-c-v2`, 100/0, 90/10, 50/50, 0/100, measured as the
/// tutorial's steps are.
#[test]
fn the_canary_with_gateway_api_routes() {
    mesh_tests::set_echo(false);
    let tutorial =
        LocalTutorial::start(Layout::ONE_NODE, &|line| println!("start: {line}")).unwrap();
    let (status, body) = tutorial.call().unwrap();
    assert_eq!(status, 200, "{body}");
    run_steps(
        &tutorial,
        "local gateway-api",
        gateway_api_canary_steps(Pace::Full),
        &|_| {},
        &|_, _| {},
    );
}

/// The same with kubectl against the real control plane: `deploy/gateway-api`'s CRDs serve the
/// routes, the agent watches them, and the demo's per-version Services get their EndpointSlices
/// from the control plane's controllers.
#[test]
fn the_canary_with_gateway_api_routes_with_kubectl() {
    mesh_tests::set_echo(false);
    let tutorial = KubernetesTutorial::start(&|line| println!("kubernetes start: {line}")).unwrap();
    let (status, body) = tutorial.call().unwrap();
    assert_eq!(status, 200, "{body}");
    run_steps(
        &tutorial,
        "kubernetes gateway-api",
        gateway_api_canary_steps(Pace::Full),
        &|_| {},
        &|_, _| {},
    );
}

#[test]
fn the_tutorial_end_to_end_on_three_nodes() {
    mesh_tests::set_echo(false);
    let tutorial =
        LocalTutorial::start(Layout::THREE_NODES, &|line| println!("start: {line}")).unwrap();
    let policies = examples_dir().join("security/call-graph.yml");
    tutorial.apply_file(&policies).unwrap();
    let capture = Capture::start(tutorial.network()).unwrap();
    // Node 2's agent reports B → C v1 twice, as B's source and as C v1's destination: Kiali,
    // reading node 2's Prometheus, must count it once.
    let b_node = &tutorial.network().nodes()[1];
    let prometheus = Prometheus::start(b_node).unwrap();
    let kiali = kiali_checks(&prometheus, "three-nodes");
    // And the graph page of B's node, from the 90/10 step on.
    let page = RefCell::new(None);
    replay(
        &tutorial,
        "default",
        "three-nodes",
        &|step| {
            if step == CANARY_90_10 {
                *page.borrow_mut() = Some(GraphPage::open(b_node).unwrap());
            }
        },
        &|step, took| {
            kiali(step, took);
            if let Some(page) = page.borrow().as_ref() {
                graph_page_checks(page, &tutorial, "three-nodes", step);
            }
        },
    );
    let captured = capture.stop().unwrap();
    let tunnelled = captured.payload_bytes_to_port(15008);
    println!("three-nodes underlay: {tunnelled} payload bytes to :15008, none to :8080");
    assert!(tunnelled > 0);
    assert_eq!(captured.payload_bytes_to_port(8080), 0);
    assert!(!captured.contains(b"HTTP/1.1").unwrap());
    assert!(!captured.contains(b"tutorial-trace-three-nodes").unwrap());

    // B's node hears A, C's nodes hear B: each as a verified identity over mutual TLS.
    let agents = tutorial.agents();
    for (agent, caller) in [
        (agents[1], "service-a"),
        (agents[1], "service-b"),
        (agents[2], "service-b"),
    ] {
        assert_received_over_mutual_tls(agent, &format!("ns/default/sa/{caller}"));
    }
    let denials = |agents: &[&Agent]| -> f64 {
        agents
            .iter()
            .map(|agent| {
                let (_, metrics) = agent.admin_get("/metrics").unwrap();
                sum_samples(&metrics, "mesh_authorization_denials_total", &[])
            })
            .sum()
    };
    assert_eq!(
        denials(&agents),
        0.0,
        "the policies denied none of the tutorial's calls"
    );
    // Every pod is STRICT (`default` in istio-system): the tutorial's calls all arrive through
    // tunnels, so the kernel refused none, and captured none in plaintext.
    let inbound = |decision: &str| -> f64 {
        agents
            .iter()
            .map(|agent| {
                let (_, metrics) = agent.admin_get("/metrics").unwrap();
                sum_samples(
                    &metrics,
                    "mesh_redirect_decisions_total",
                    &[("decision", decision)],
                )
            })
            .sum()
    };
    assert_eq!(inbound("inbound_refused"), 0.0);
    assert_eq!(inbound("inbound_captured"), 0.0);

    // Off the graph: A may call B, but not C.
    let from_a = |service: &str| {
        let url = format!("http://{service}:8080/");
        let args = ["get", "--url", &url, "--count", "5", "--quiet"];
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_upstream"));
        command.args(args);
        let mut get = tutorial.spawn_in("service-a", command).unwrap();
        get.finish(Duration::from_secs(30)).unwrap();
        get.stdout()
            .json_lines()
            .into_iter()
            .rfind(|line| line["summary"] == true)
            .expect("a summary")["by_status"]
            .clone()
    };
    assert_eq!(from_a("service-c"), serde_json::json!({"403": 5}));
    assert_eq!(from_a("service-b"), serde_json::json!({"200": 5}));
    assert_eq!(denials(&agents), 5.0);
    println!("three-nodes call graph: the tutorial's calls allowed, A → C denied 5 of 5");
}

/// The control of the test above: the same calls through the gateway on the same three nodes,
/// with the agents given no CA, are found on the underlay in plaintext.
#[test]
fn without_mutual_tls_the_three_node_tutorials_calls_cross_in_plaintext() {
    mesh_tests::set_echo(false);
    let plaintext = Layout {
        mutual_tls: false,
        ..Layout::THREE_NODES
    };
    let tutorial = LocalTutorial::start(plaintext, &|line| println!("start: {line}")).unwrap();
    let capture = Capture::start(tutorial.network()).unwrap();
    for _ in 0..10 {
        let (status, body) = tutorial
            .call_with(&[("x-request-id", "tutorial-trace-three-nodes")])
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let captured = capture.stop().unwrap();
    let plaintext = captured.payload_bytes_to_port(8080);
    println!(
        "three-nodes underlay without a CA: {plaintext} payload bytes to :8080, none to :15008"
    );
    assert!(plaintext > 0);
    assert_eq!(captured.payload_bytes_to_port(15008), 0);
    assert!(captured.contains(b"HTTP/1.1").unwrap());
    assert!(captured.contains(b"tutorial-trace-three-nodes").unwrap());
}

#[test]
fn the_tutorial_end_to_end_with_kubectl() {
    mesh_tests::set_echo(false);
    let tutorial = KubernetesTutorial::start(&|line| println!("kubernetes start: {line}")).unwrap();
    replay(
        &tutorial,
        mesh_tests::tutorial::kubernetes::NAMESPACE,
        "kubernetes",
        &|_| {},
        &|_, _| {},
    );
    // Every hop went through a tunnel, with certificates from the signer: the apps' (the
    // namespace's default service account) and the ingress gateway's (the agent's own).
    for caller in [
        "ns/servicemesh-apps/sa/default",
        "ns/sidecarless-system/sa/mesh-agent",
    ] {
        assert_received_over_mutual_tls(tutorial.agents()[0], caller);
        let log = tutorial.signer().log();
        assert!(
            log.lines()
                .any(|line| line.contains("signed") && line.contains(caller)),
            "the signer signed {caller}: {log}"
        );
    }
}

/// After the canary's 90/10 step and the crashed-replica step, Kiali's namespace graph over
/// the step's span, from what `prometheus` scraped: every series has the labels Kiali needs,
/// A → B carries traffic, B → C v2 carries 10 % ± 2 of B → C, then 35–65 % errors. Where a
/// request is reported by both its source and its destination agent, the graph must count it
/// once, or the split is off.
fn kiali_checks<'a>(prometheus: &'a Prometheus, mode: &'a str) -> impl Fn(&str, Duration) + 'a {
    move |step, took| {
        let kiali = || {
            prometheus.wait_for_scrape().unwrap();
            let graph = kiali::namespace_graph(prometheus, "default", took).unwrap();
            assert!(
                graph.skipped.is_empty(),
                "Kiali skips series without its labels: {:?}",
                graph.skipped
            );
            graph
        };
        match step {
            CANARY_90_10 => {
                let graph = kiali();
                let (a_to_b, _) = graph.rate("service-a", "service-b", None);
                let (v1, _) = graph.rate("service-b", "service-c", Some("v1"));
                let (v2, _) = graph.rate("service-b", "service-c", Some("v2"));
                let share = 100.0 * v2 / (v1 + v2);
                println!(
                    "{mode} Kiali graph at 90/10: A→B {a_to_b:.1} req/s, B→C v1 {v1:.1}, \
                     B→C v2 {v2:.1} ({share:.1}%)"
                );
                assert!(a_to_b > 0.0, "{graph:?}");
                assert!((8.0..=12.0).contains(&share), "{graph:?}");
            }
            "crashed replica, no policy" => {
                let graph = kiali();
                let (all, errors) = graph.rate("service-b", "service-c", Some("v2"));
                let share = 100.0 * errors / all;
                println!("{mode} Kiali graph, one replica crashed: B→C v2 {share:.0}% errors");
                assert!((35.0..=65.0).contains(&share), "{graph:?}");
            }
            _ => {}
        }
    }
}

/// `agent` reported, as the destination, connections over mutual TLS from the identity
/// `spiffe://cluster.local/{caller}`.
fn assert_received_over_mutual_tls(agent: &Agent, caller: &str) {
    let (_, metrics) = agent.admin_get("/metrics").unwrap();
    let principal = format!("spiffe://cluster.local/{caller}");
    let received = sum_samples(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &principal),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        received > 0.0,
        "no destination report of {caller} over mutual TLS:\n{metrics}"
    );
}

/// The baseline, a trace through the chain, then every step in order: each passed to `before`
/// as it starts, and to `after` with how long it took once it has passed.
fn replay(
    tutorial: &impl World,
    namespace: &str,
    mode: &str,
    before: &dyn Fn(&str),
    after: &dyn Fn(&str, Duration),
) {
    // Baseline: the whole chain through the gateway.
    let (status, body) = tutorial.call().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(matches!(answer(&body), Answer::Version(_)), "{body}");
    println!("{mode} baseline: {}", body.trim());

    // Tracing: one request's trace runs through both hops and the gateway, each hop's span a
    // child of the one before (the apps only propagate the headers).
    let request_id = format!("tutorial-trace-{mode}");
    let (status, _) = tutorial
        .call_with(&[("x-request-id", &request_id)])
        .unwrap();
    assert_eq!(status, 200);
    let hops = tutorial
        .wait_for_records(
            3,
            &|r| r["request_id"] == request_id.as_str(),
            Duration::from_secs(10),
        )
        .unwrap();
    let hop = |service: &str| {
        hops.iter()
            .find(|r| {
                r["destination_service"] == format!("{service}.{namespace}.svc.cluster.local")
            })
            .unwrap_or_else(|| panic!("no hop to {service}: {hops:?}"))
    };
    let (to_a, to_b, to_c) = (hop("service-a"), hop("service-b"), hop("service-c"));
    assert_eq!(to_a["trace_id"], to_b["trace_id"], "{hops:?}");
    assert_eq!(to_b["trace_id"], to_c["trace_id"], "{hops:?}");
    assert_eq!(to_b["parent_span_id"], to_a["span_id"], "{hops:?}");
    assert_eq!(to_c["parent_span_id"], to_b["span_id"], "{hops:?}");
    println!(
        "{mode} trace {} spans gateway→A {} → B {} → C {}",
        to_a["trace_id"], to_a["span_id"], to_b["span_id"], to_c["span_id"]
    );

    // The tutorial's steps in order (see `mesh_tests::tutorial::steps`): canary 1-4 over 1,000
    // requests each (v2 exactly 0%, 10% ± 2, 50% ± 3, exactly 100%), then v1 scaled to 0 and v2
    // to 2 replicas with one crashed: errors 35-65% with no policy, at most 5% with outlier
    // detection, none of 1,000 with retries; the repaired replica back within the ejection it
    // still had at repair (each ejection is baseEjectionTime × how many it has had) + interval
    // + 2 s.
    run_steps(tutorial, mode, steps(Pace::Full), before, after);
}

/// Each step in order, passed to `before` as it starts and to `after` with how long it took
/// once it has passed.
fn run_steps(
    tutorial: &impl World,
    mode: &str,
    steps: Vec<Step>,
    before: &dyn Fn(&str),
    after: &dyn Fn(&str, Duration),
) {
    for step in steps {
        before(step.name);
        let started = Instant::now();
        let outcome = tutorial.run_step(&step).unwrap();
        let took = started.elapsed();
        let commands: Vec<String> = step.actions.iter().map(|a| tutorial.command(a)).collect();
        println!("{mode} {:<40} {}", step.name, outcome.shown);
        if !commands.is_empty() {
            println!("    ({})", commands.join("; "));
        }
        if !outcome.error_samples.is_empty() {
            println!("    e.g. {:?}", outcome.error_samples);
        }
        assert!(
            outcome.passed,
            "{mode} {}: showed {}, expected {}",
            step.name, outcome.shown, step.expected
        );
        after(step.name, took);
    }
}
