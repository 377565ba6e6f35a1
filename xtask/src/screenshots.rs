//! `cargo xtask screenshots`: the pictures of docs/tutorial.md, taken by the tutorial's
//! end-to-end test (one node, local mode), whose real browser saves the agent's graph page at
//! the canary's 90/10 step and while the circuit breaker has the crashed replica ejected
//! (`target/screenshots/`); copied here into `docs/images/`.

use anyhow::{Context, Result};

use crate::{build_ebpf, cargo};

/// The screenshots the test saves, by name.
const SHOTS: [&str; 2] = ["canary-90-10", "circuit-breaker"];

pub fn run() -> Result<()> {
    mesh_tests::require_root();
    let root = build_ebpf::workspace_root();
    build_ebpf::run()?;
    cargo(&root, &["build", "--workspace", "--bins"])?;
    let taken = root.join("target/screenshots");
    for shot in SHOTS {
        // None left from an earlier run passes for this one's.
        let _ = std::fs::remove_file(taken.join(format!("{shot}.png")));
    }
    crate::test::tutorial(&root, &["--exact", "the_tutorial_end_to_end"])?;
    let docs = root.join("docs/images");
    std::fs::create_dir_all(&docs)?;
    for shot in SHOTS {
        let from = taken.join(format!("{shot}.png"));
        let to = docs.join(format!("graph-{shot}.png"));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        println!("{}", to.display());
    }
    Ok(())
}
