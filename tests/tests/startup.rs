//! Start-up never fails on what a running agent tolerates, and one bad object is rejected by
//! itself — local mode, on a simulated node, through the real agent and kernel redirect:
//!
//! - a bad edit to an object in force while an agent ran keeps its last good version in force,
//!   a file that does not parse is tolerated, and an `--enroll` network namespace vanished
//!   meanwhile: the restarted agent starts with the valid part of the folder (the bad object
//!   left out: nothing is persisted, so it never saw a good version), skips the namespace with
//!   a warning, serves, and reports what it left out (log, `mesh_config_rejected_objects`,
//!   `/config_dump`);
//! - with the invalid object still there, a change to another namespace's rule is in force
//!   within a second;
//! - a route to a subset no DestinationRule defines yet is taken (a warning), its requests are
//!   answered 503 `NR`, and the rule arriving puts it to work.
//!
//! The Kubernetes half (the same behaviours through the API server's watches, and the Event on
//! the object) is in `kubernetes.rs`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{require_root, wait_for, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a change to the folder must be in force (the bound).
const PROMPTLY: Duration = Duration::from_secs(1);
const URL: &str = "http://service-c:8080/";

/// A VirtualService in namespace `shop` whose timeout is no duration (the object rejected), and
/// a valid one in the same file (in force: only the bad object is rejected).
const SHOP_RULES: &str = "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - timeout: soon
    route:
    - destination: {host: reviews}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
";

/// The canary's VirtualService sending everything to `subset`.
fn all_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
         metadata: {{name: service-c}}\nspec:\n  hosts: [service-c]\n  http:\n  - route:\n    \
         - destination: {{host: service-c, subset: {subset}}}\n"
    )
}

/// `rules` with the bad timeout taken out.
fn mended(rules: &str) -> String {
    rules.replace("  - timeout: soon\n    route:", "  - route:")
}

/// The agent's `/config_dump`.
fn dump(agent: &Agent) -> Result<Value> {
    let (_, dump) = agent.admin_get("/config_dump")?;
    Ok(serde_json::from_str(&dump)?)
}

/// The names of the objects in force in `dump`.
fn in_force(dump: &Value) -> Vec<String> {
    dump["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| Some(o["metadata"]["name"].as_str()?.to_owned()))
        .collect()
}

/// What `dump` says of each rejection, as `outcome|name`.
fn outcomes(dump: &Value) -> Result<Vec<String>> {
    Ok(dump["rejected"]
        .as_array()
        .context("/config_dump has rejected")?
        .iter()
        .map(|r| {
            format!(
                "{}|{}",
                r["outcome"].as_str().unwrap_or_default(),
                r["name"]
            )
        })
        .collect())
}

/// `upstream get` of [`URL`] from `client`, `count` times: every response line and the summary.
fn get(node: &SimNode, client: &Pod, count: usize) -> Result<(Vec<Value>, Value)> {
    let mut command = Command::new(UPSTREAM);
    command.args(["get", "--url", URL, "--count", &count.to_string()]);
    let mut process = node.spawn_in_pod(client, command)?;
    ensure!(
        process.finish(TIMEOUT)?.success(),
        "upstream get failed: {}",
        process.stderr().text()
    );
    let mut lines = process.stdout().json_lines();
    let summary = lines.pop().context("upstream get printed nothing")?;
    Ok((lines, summary))
}

fn by_body(summary: &Value, body: &str) -> u64 {
    summary["by_body"][body].as_u64().unwrap_or(0)
}

/// `mesh_config_rejected_objects{kind}` as the agent serves it.
fn rejected_objects(agent: &Agent, kind: &str) -> Result<f64> {
    let (_, metrics) = agent.admin_get("/metrics")?;
    let wanted = format!("mesh_config_rejected_objects{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&wanted)?.parse().ok())
        .with_context(|| format!("no {wanted}in /metrics"))
}

/// Waits until every one of `count` requests is answered by `pod`; how long that took.
fn until_all_from(node: &SimNode, client: &Pod, pod: &str, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    wait_for(&format!("every request answered by {pod}"), within, || {
        let (_, summary) = get(node, client, 5)?;
        Ok((by_body(&summary, pod) == 5).then_some(()))
    })?;
    Ok(started.elapsed())
}

#[test]
fn a_restarted_agent_starts_with_the_valid_part_and_one_bad_object_holds_nothing_up() -> Result<()>
{
    require_root();
    let node = SimNode::new()?;
    let client = node.add_pod("client")?;
    let mut servers: Vec<PodProcess> = Vec::new();
    let mut backends = Vec::new();
    for (name, version) in [("service-c-v1", "v1"), ("service-c-v2", "v2")] {
        let pod = node.add_pod(name)?;
        let mut serve = Command::new(UPSTREAM);
        serve.args(["serve", "--listen", "0.0.0.0:8080", "--name", name]);
        let server = node.spawn_in_pod(&pod, serve)?;
        server
            .stdout()
            .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)?;
        servers.push(server);
        backends.push((pod, version));
    }
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 30);
    node.add_host("service-c", vip)?;
    let config = ConfigDir::new()?;
    let labels = [[("version", "v1")], [("version", "v2")]];
    let backends: Vec<Backend<'_>> = backends
        .iter()
        .zip(&labels)
        .map(|((pod, _), labels)| Backend { pod, labels })
        .collect();
    config.service("service-c", vip, 8080, "http", &backends)?;
    config.copy_example("destination-rules.yml", "destination-rules.yml")?;
    config.copy_example("canary/4-vs-v2.yml", "canary.yml")?;

    // A pod's namespace that the first agent enrolls and that vanishes while it runs.
    let ghost = format!("{}-ghost", node.netns_name());
    let ip = |args: &[&str]| -> Result<()> {
        let status = Command::new("ip").args(args).status()?;
        ensure!(status.success(), "ip {args:?} failed");
        Ok(())
    };
    ip(&["netns", "add", &ghost])?;
    ip(&["-n", &ghost, "link", "set", "lo", "up"])?;
    let ghost_arg = format!("ghost=/run/netns/{ghost}");
    let folder = config.path().to_str().context("UTF-8 path")?.to_owned();
    let args = ["--config", folder.as_str(), "--enroll", ghost_arg.as_str()];

    let mut first = Agent::start(&node, &[&client], &args)?;
    ensure!(
        first.enrolled()? == ["default/client", "default/ghost"],
        "{:?}",
        first.enrolled()?
    );
    let (_, summary) = get(&node, &client, 10)?;
    ensure!(by_body(&summary, "service-c-v2") == 10, "{summary}");

    // While it runs: shop's rules arrive valid, then a bad edit breaks `reviews` (its last
    // good version stays in force) and a file that does not parse appears, which it tolerates
    // (the rest stays in force); the ghost's namespace goes.
    let shop = config.path().join("shop.yml").display().to_string();
    config.write("shop.yml", &mended(SHOP_RULES))?;
    wait_for("shop's rules in force", TIMEOUT, || {
        Ok(in_force(&dump(&first)?)
            .contains(&"reviews".to_owned())
            .then_some(()))
    })?;
    config.write("shop.yml", SHOP_RULES)?;
    config.write("broken.yml", "kind: [unclosed\n")?;
    wait_for("the first agent to report the bad file", TIMEOUT, || {
        Ok(first
            .stderr_text()
            .contains("broken.yml: invalid YAML")
            .then_some(()))
    })?;
    let kept = format!(
        "rejected, the last good version stays in force: {shop}: VirtualService shop/reviews: \
         spec.http[0].timeout: invalid duration \"soon\""
    );
    wait_for("the bad edit reported", TIMEOUT, || {
        Ok(first.stderr_text().contains(&kept).then_some(()))
    })?;
    let first_dump = dump(&first)?;
    ensure!(
        in_force(&first_dump).contains(&"reviews".to_owned())
            && outcomes(&first_dump)? == ["left_out|null", "last_good_in_force|\"reviews\""],
        "the last good version of reviews in force: {first_dump}"
    );
    let (_, summary) = get(&node, &client, 10)?;
    ensure!(by_body(&summary, "service-c-v2") == 10, "{summary}");
    ip(&["netns", "delete", &ghost])?;
    first.process().signal(libc::SIGTERM)?;
    first.process().wait_timeout(TIMEOUT)?;
    drop(first);

    // Restarted with the same folder and flags: it starts, with what is valid.
    let restarted = Instant::now();
    let agent = Agent::start(&node, &[&client], &args)?;
    let ready_in = restarted.elapsed();
    let log = agent.stderr_text();
    ensure!(
        log.contains("--enroll default/ghost: skipped")
            && log.contains(&format!("cannot open network namespace /run/netns/{ghost}")),
        "the vanished namespace is skipped with a warning:\n{log}"
    );
    ensure!(
        agent.enrolled()? == ["default/client"],
        "{:?}",
        agent.enrolled()?
    );
    // Nothing was persisted: the restarted agent never saw a good version of reviews.
    ensure!(
        log.contains(&format!(
            "left out of the config in force: {shop}: VirtualService shop/reviews: \
             spec.http[0].timeout: invalid duration \"soon\""
        )),
        "the bad object is logged with file, object, field and reason:\n{log}"
    );
    ensure!(log.contains("broken.yml: invalid YAML"), "{log}");
    ensure!(rejected_objects(&agent, "VirtualService")? == 1.0);
    ensure!(rejected_objects(&agent, "unknown")? == 1.0);
    let dump = dump(&agent)?;
    ensure!(
        outcomes(&dump)? == ["left_out|null", "left_out|\"reviews\""],
        "{dump}"
    );
    let rejected: Vec<String> = dump["rejected"]
        .as_array()
        .context("/config_dump has rejected")?
        .iter()
        .map(|r| format!("{}|{}", r["name"], r["source"]))
        .collect();
    ensure!(rejected.len() == 2, "{rejected:?}");
    ensure!(
        rejected[1] == format!("\"reviews\"|\"{shop}\""),
        "{rejected:?}"
    );
    let names = in_force(&dump);
    ensure!(
        names.contains(&"ratings".to_owned()) && !names.contains(&"reviews".to_owned()),
        "the file's other object is in force: {names:?}"
    );
    // It serves, with the canary in force, every request through it.
    let before = agent.access_log().len();
    let (_, summary) = get(&node, &client, 10)?;
    ensure!(by_body(&summary, "service-c-v2") == 10, "{summary}");
    agent.wait_for_records(before + 10, |_| true, TIMEOUT)?;

    // The bad object still there, a change to namespace default's rule: in force within 1 s.
    let changed = Instant::now();
    config.write("canary.yml", &all_to("version-v1"))?;
    until_all_from(&node, &client, "service-c-v1", PROMPTLY)?;
    let change_took = changed.elapsed();

    // A subset no DestinationRule defines yet: taken with a warning, answered 503 NR ...
    config.write("canary.yml", &all_to("version-v3"))?;
    let answer = wait_for(
        "503 NR for the subset not defined yet",
        PROMPTLY * 5,
        || {
            let (lines, _) = get(&node, &client, 1)?;
            Ok(lines
                .into_iter()
                .next()
                .filter(|line| line["status"] == 503))
        },
    )?;
    ensure!(
        answer["headers"]["x-mesh-response-flags"] == "NR" && answer["body"] == "cluster not found",
        "{answer}"
    );
    ensure!(
        agent.stderr_text().contains(
            "VirtualService default/service-c: spec.http[0].route[0].destination.subset: \
             subset \"version-v3\" is not defined (yet)"
        ),
        "{}",
        agent.stderr_text()
    );
    // ... until the rule defines it.
    config.write(
        "more-subsets.yml",
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
         metadata: {name: service-c-more}\nspec:\n  host: service-c\n  subsets:\n  \
         - {name: version-v3, labels: {version: v2}}\n",
    )?;
    until_all_from(&node, &client, "service-c-v2", PROMPTLY * 5)?;

    // Mended, nothing is left out.
    config.write("shop.yml", &mended(SHOP_RULES))?;
    std::fs::remove_file(config.path().join("broken.yml"))?;
    wait_for("nothing left out", TIMEOUT, || {
        Ok((rejected_objects(&agent, "VirtualService")? == 0.0
            && rejected_objects(&agent, "unknown")? == 0.0)
            .then_some(()))
    })?;
    eprintln!(
        "restarted with a bad file and a vanished netns: ready in {ready_in:?}; another \
         namespace's change in force {change_took:?} after the write, the bad object present"
    );
    drop(servers);
    Ok(())
}
