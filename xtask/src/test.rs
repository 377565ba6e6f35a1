//! `cargo xtask test`: everything CI runs, in order.

use anyhow::Result;

use crate::{bench, build_ebpf, cargo};

/// The end-to-end replay of the tutorial (tests/tests/tutorial.rs).
const TUTORIAL: &str = "the_tutorial_end_to_end";

pub fn run(cargo_args: &[String]) -> Result<()> {
    mesh_tests::require_root();
    let root = build_ebpf::workspace_root();
    build_ebpf::run()?;
    cargo(&root, &["fmt", "--all", "--", "--check"])?;
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
    let result = if cargo_args.is_empty() {
        // The tutorial runs last and uncaptured, so CI shows the shares and error counts it
        // measured at every step.
        cargo(&root, &["test", "--workspace", "--", "--skip", TUTORIAL]).and_then(|()| {
            cargo(
                &root,
                &[
                    "test",
                    "-p",
                    "mesh-tests",
                    "--test",
                    "tutorial",
                    "--",
                    "--nocapture",
                ],
            )
        })
    } else {
        let mut test = vec!["test", "--workspace"];
        test.extend(cargo_args.iter().map(String::as_str));
        cargo(&root, &test)
    };
    // Tests clean up after themselves, even when they fail; this catches processes that were
    // killed outright.
    for leftover in mesh_tests::sweep_all_stale()? {
        println!("removed a leftover of a killed test: {leftover}");
    }
    result?;
    let leftovers = mesh_tests::leftovers();
    if !leftovers.is_empty() {
        anyhow::bail!("the tests left these behind: {leftovers:?}");
    }
    println!("no namespace, link, cgroup or pin of the tests remains");
    if cargo_args.is_empty() {
        // A smoke check of the benchmark harness: every scenario answers without errors. It
        // asserts nothing about speed; the full bench is run by hand.
        bench::quick()?;
    }
    Ok(())
}
