//! The tutorial, replayed in order with the real demo apps (Python → Deno → Java) on a simulated
//! node, measuring what the tutorial shows at each step.

use std::time::{Duration, Instant};

use mesh_tests::tutorial::{answer, tally, Answer, Tutorial};

fn step(tutorial: &Tutorial, name: &str, count: usize) -> (usize, usize, usize) {
    let bodies = tutorial.load(count, 4).unwrap();
    let (v1, v2, errors) = tally(&bodies);
    println!("{name:<48} v1={v1:<5} v2={v2:<5} errors={errors:<5} (of {count})");
    if errors > 0 {
        let sample: Vec<&String> = bodies
            .iter()
            .filter(|b| !b.starts_with("Service A <- Service B <- Service C"))
            .take(3)
            .collect();
        println!("    e.g. {sample:?}");
    }
    (v1, v2, errors)
}

#[test]
fn the_tutorial_end_to_end() {
    let tutorial = Tutorial::start().unwrap();

    // Baseline: the whole chain through the gateway.
    let (status, body) = tutorial.call().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(matches!(answer(&body), Answer::Version(_)), "{body}");
    println!("baseline: {}", body.trim());

    // Tracing: one request's trace runs through both hops and the gateway, each hop's span a
    // child of the one before (the apps only propagate the headers).
    let (status, _) = tutorial
        .call_with(&[("x-request-id", "tutorial-trace")])
        .unwrap();
    assert_eq!(status, 200);
    let hops = tutorial
        .agent()
        .wait_for_records(
            3,
            |r| r["request_id"] == "tutorial-trace",
            Duration::from_secs(10),
        )
        .unwrap();
    let hop = |service: &str| {
        hops.iter()
            .find(|r| r["destination_service"] == format!("{service}.default.svc.cluster.local"))
            .unwrap_or_else(|| panic!("no hop to {service}: {hops:?}"))
    };
    let (to_a, to_b, to_c) = (hop("service-a"), hop("service-b"), hop("service-c"));
    assert_eq!(to_a["trace_id"], to_b["trace_id"], "{hops:?}");
    assert_eq!(to_b["trace_id"], to_c["trace_id"], "{hops:?}");
    assert_eq!(to_b["parent_span_id"], to_a["span_id"], "{hops:?}");
    assert_eq!(to_c["parent_span_id"], to_b["span_id"], "{hops:?}");
    println!(
        "trace {} spans gateway→A {} → B {} → C {}",
        to_a["trace_id"], to_a["span_id"], to_b["span_id"], to_c["span_id"]
    );

    // Canary releases, steps 1-4.
    tutorial.apply("destination-rules.yml").unwrap();
    tutorial.apply("canary/1-vs-v1.yml").unwrap();
    let (_, v2, errors) = step(&tutorial, "canary 1: 100/0", 1000);
    assert_eq!((v2, errors), (0, 0));
    tutorial.apply("canary/2-vs-v1_and_v2_90_10.yml").unwrap();
    let (_, v2, errors) = step(&tutorial, "canary 2: 90/10", 1000);
    assert_eq!(errors, 0);
    assert!((80..=120).contains(&v2), "v2 share {v2}/1000");
    tutorial.apply("canary/3-vs-v1_and_v2_50_50.yml").unwrap();
    let (_, v2, errors) = step(&tutorial, "canary 3: 50/50", 1000);
    assert_eq!(errors, 0);
    assert!((470..=530).contains(&v2), "v2 share {v2}/1000");
    tutorial.apply("canary/4-vs-v2.yml").unwrap();
    let (v1, v2, errors) = step(&tutorial, "canary 4: 0/100", 1000);
    assert_eq!((v1, v2, errors), (0, 1000, 0));

    // Circuit breaker and retries: v1 scaled to 0, v2 to 2, one v2 replica crashed.
    tutorial.apply("circuit-breaker/1-vs.yml").unwrap();
    tutorial.scale("service-c-v1", 0).unwrap();
    tutorial.scale("service-c-v2", 2).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let crashed = tutorial.pods("service-c-v2")[0].clone();
    tutorial.crash(&crashed).unwrap();
    let (_, _, errors) = step(&tutorial, "crashed replica, no policy", 400);
    assert!(
        (140..=260).contains(&errors),
        "errors {errors}/400 (35-65% expected)"
    );

    tutorial
        .apply("circuit-breaker/2-destination-rules.yml")
        .unwrap();
    let (_, _, errors) = step(&tutorial, "crashed replica, outlier detection", 400);
    assert!(errors <= 20, "errors {errors}/400 (at most 5% expected)");

    tutorial.apply("circuit-breaker/3-vs-retry.yml").unwrap();
    let (_, _, errors) = step(
        &tutorial,
        "crashed replica, outlier detection + retries",
        1000,
    );
    assert_eq!(errors, 0);

    // Repair: the replica serves again within baseEjectionTime + interval + 2 s.
    tutorial.repair(&crashed).unwrap();
    let repaired = Instant::now();
    let suffix = crashed.rsplit('-').next().unwrap().to_owned();
    loop {
        let (_, body) = tutorial.call().unwrap();
        if body.contains(&format!("| v2 | {suffix} |")) {
            break;
        }
        assert!(
            repaired.elapsed() < Duration::from_secs(10 + 2 + 2),
            "not back after {:?}",
            repaired.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "repaired replica serves again after {:?}",
        repaired.elapsed()
    );
}
