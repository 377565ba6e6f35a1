//! `mesh-agent stat` on a simulated node, while a pod sends a steady load through the tutorial's
//! 90/10 canary: the table it prints shows service-c's two versions with their shares, all
//! answered, with latencies.

use std::{process::Command, time::Duration};

use mesh_tests::{canary::Canary, require_root, stat, Agent, SimNode};

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn stat_shows_the_canary_split_while_the_load_runs() {
    require_root();
    let node = SimNode::new().unwrap();
    let canary = Canary::start(&node, UPSTREAM, "canary/2-vs-v1_and_v2_90_10.yml").unwrap();
    let agent = Agent::start(
        &node,
        &[&canary.client],
        &["--config", canary.config.path().to_str().unwrap()],
    )
    .unwrap();

    // 200 requests a second for 8 s; the table covers 3 s in the middle.
    let mut get = Command::new(UPSTREAM);
    get.args(["get", "--url", "http://service-c:8080/", "--count", "1600"]);
    get.args(["--rate", "200", "--concurrency", "2", "--quiet"]);
    let mut load = node.spawn_in_pod(&canary.client, get).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let table = stat::table(stat::start(&agent, 3).unwrap()).unwrap();
    println!("{table}");
    assert!(load.finish(TIMEOUT).unwrap().success());

    // SERVICE VERSION RPS SHARE SUCCESS P50 P99
    let row = |version| {
        stat::row(&table, "service-c", version)
            .unwrap_or_else(|| panic!("no row for service-c {version}:\n{table}"))
    };
    let percent = |column: &String| stat::percent(column);
    let (v1, v2) = (row("v1"), row("v2"));
    let (rps_v1, rps_v2) = (v1[2].parse::<f64>().unwrap(), v2[2].parse::<f64>().unwrap());
    assert!((150.0..=250.0).contains(&(rps_v1 + rps_v2)), "{table}");
    assert!((7.0..=13.0).contains(&percent(&v2[3])), "{table}");
    assert!((87.0..=93.0).contains(&percent(&v1[3])), "{table}");
    assert_eq!(
        (percent(&v1[4]), percent(&v2[4])),
        (100.0, 100.0),
        "{table}"
    );
    assert!(v1[5].ends_with("ms") && v1[6].ends_with("ms"), "{table}");
}
