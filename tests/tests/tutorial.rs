//! The tutorial, replayed in order with the real demo apps (Python → Deno → Java) on a simulated
//! node, measuring what the tutorial shows at each step.

use std::time::Duration;

use mesh_tests::tutorial::{answer, steps, Answer, Pace, Tutorial};

#[test]
fn the_tutorial_end_to_end() {
    // This test runs uncaptured in CI to show its figures; the apps' and agent's own output
    // would drown them.
    mesh_tests::set_echo(false);
    // On a fresh machine starting takes minutes (Deno from npm, perhaps a JDK): say what it does.
    let tutorial = Tutorial::start(&|line| println!("start: {line}")).unwrap();

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

    // The tutorial's steps in order (see `mesh_tests::tutorial::steps`): canary 1-4 over 1,000
    // requests each (v2 exactly 0%, 10% ± 2, 50% ± 3, exactly 100%), then v1 scaled to 0 and v2
    // to 2 replicas with one crashed: errors 35-65% with no policy, at most 5% with outlier
    // detection, none of 1,000 with retries; the repaired replica back within the ejection it
    // still had at repair (each ejection is baseEjectionTime × how many it has had) + interval
    // + 2 s.
    for step in steps(Pace::Full) {
        let outcome = tutorial.run_step(&step).unwrap();
        println!("{:<40} {}", step.name, outcome.shown);
        if !outcome.error_samples.is_empty() {
            println!("    e.g. {:?}", outcome.error_samples);
        }
        assert!(
            outcome.passed,
            "{}: showed {}, expected {}",
            step.name, outcome.shown, step.expected
        );
    }
}
