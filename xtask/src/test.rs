//! `cargo xtask test`: everything CI runs, in order.

use anyhow::Result;

use crate::{build_ebpf, cargo};

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
    let mut test = vec!["test", "--workspace"];
    test.extend(cargo_args.iter().map(String::as_str));
    let result = cargo(&root, &test);
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
    Ok(())
}
