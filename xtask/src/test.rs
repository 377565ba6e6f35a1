//! `cargo xtask test`: everything CI runs, in order.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};

use crate::{bench, build_ebpf, cargo, fuzz, tools};

/// The end-to-end replays of the tutorial, local and Kubernetes mode (tests/tests/tutorial.rs;
/// `--skip` matches both by this prefix).
const TUTORIAL: &str = "the_tutorial_end_to_end";

/// The tutorial's end-to-end tests, uncaptured, with `filter` (test names, libtest options).
pub fn tutorial(root: &Path, filter: &[&str]) -> Result<()> {
    let mut args = vec![
        "test",
        "--workspace",
        "--test",
        "tutorial",
        "--",
        "--nocapture",
    ];
    args.extend(filter);
    cargo(root, &args)
}

/// Seconds each fuzz target runs in CI.
const CI_FUZZ_SECONDS: u32 = 10;

/// cargo-deny, pinned so CI checks with the same rules every time; 0.20.2 builds with rustc 1.88
/// and later.
const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn run(cargo_args: &[String]) -> Result<()> {
    mesh_tests::require_root();
    let root = build_ebpf::workspace_root();
    build_ebpf::run()?;
    cargo(&root, &["fmt", "--all", "--", "--check"])?;
    cargo_deny(&root)?;
    bench::symbol_order::check_dependencies(&root)?;
    cargo(
        &root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // Binaries first: end-to-end tests start the agent and the probe as processes.
    cargo(&root, &["build", "--workspace", "--bins"])?;
    // The Kubernetes tests' control plane: built here, on first use, rather than inside the first
    // test that starts one, so its progress is on screen and its time reported on its own. It
    // fails, saying why, where apt or Debian's archive cannot be reached.
    let started = Instant::now();
    mesh_tests::control_plane::ensure_binaries()
        .context("building the Kubernetes control plane for the tests")?;
    println!(
        "Kubernetes {} control plane binaries ready ({:.0} s)",
        mesh_tests::control_plane::KUBERNETES_VERSION,
        started.elapsed().as_secs_f64()
    );
    // The Prometheus the tutorial's replay is scraped by, and the browser that loads the
    // agent's graph page during it (Debian's packages).
    let packages = [&["prometheus"][..], &mesh_tests::browser::PACKAGES].concat();
    mesh_tests::packages::ensure(&packages, |line| println!("packages: {line}"))?;
    let started = Instant::now();
    let result = if cargo_args.is_empty() {
        // The tutorial runs last and uncaptured, so CI shows the shares and error counts it
        // measured at every step; its two modes one after the other, as each measures timings
        // the other would skew. `--workspace`, not `-p mesh-tests`: the same features as the
        // run before, so nothing is rebuilt.
        cargo(&root, &["test", "--workspace", "--", "--skip", TUTORIAL])
            .and_then(|()| tutorial(&root, &["--test-threads", "1"]))
    } else {
        let mut test = vec!["test", "--workspace"];
        test.extend(cargo_args.iter().map(String::as_str));
        cargo(&root, &test)
    };
    println!("tests ran in {:.0} s", started.elapsed().as_secs_f64());
    // Tests clean up after themselves, even when they fail; this catches processes that were
    // killed outright.
    for leftover in mesh_tests::sweep_all_stale()?
        .into_iter()
        .chain(mesh_tests::control_plane::sweep_stale()?)
    {
        println!("removed a leftover of a killed test: {leftover}");
    }
    result?;
    let mut leftovers = mesh_tests::leftovers();
    leftovers.extend(mesh_tests::control_plane::leftovers());
    if !leftovers.is_empty() {
        anyhow::bail!("the tests left these behind: {leftovers:?}");
    }
    println!("no namespace, link, cgroup, pin or control plane of the tests remains");
    if cargo_args.is_empty() {
        // A short fuzzing run of every target (regressions and shallow finds); long runs are
        // `cargo xtask fuzz --seconds N` by hand.
        let started = Instant::now();
        fuzz::run(&fuzz::Args {
            seconds: CI_FUZZ_SECONDS,
            targets: Vec::new(),
        })?;
        println!("fuzzing ran in {:.0} s", started.elapsed().as_secs_f64());
        // A smoke check of the benchmark harness: every scenario answers without errors, on the
        // debug binaries built above. It asserts nothing about speed; the bench, `--quick`
        // included, is run by hand.
        bench::ci_smoke()?;
    }
    Ok(())
}

/// `cargo deny check licenses bans sources` against deny.toml, with the pinned cargo-deny.
/// Advisories are left out: their database cannot be fetched where CI runs, and no other check
/// fetches it.
fn cargo_deny(root: &Path) -> Result<()> {
    tools::cargo_install("cargo-deny", "cargo-deny", Some(CARGO_DENY_VERSION))?;
    let path = tools::path_with_tools()?;
    let args = ["deny", "--locked", "check", "licenses", "bans", "sources"];
    println!("+ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .env("PATH", path)
        .status()
        .context("running cargo deny")?;
    if !status.success() {
        bail!("cargo deny found licenses, crates or sources deny.toml does not allow ({status})");
    }
    Ok(())
}
