//! `cargo xtask test`: everything CI runs, in order.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build_ebpf::{self, workspace_root};

pub fn run(cargo_args: &[String]) -> Result<()> {
    build_ebpf::run()?;
    let root = workspace_root();
    cargo(&root, &["fmt", "--all", "--", "--check"])?;
    cargo(&root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // Binaries first: end-to-end tests start the agent and probe as processes.
    cargo(&root, &["build", "--workspace", "--bins"])?;
    let mut test = vec!["test", "--workspace"];
    test.extend(cargo_args.iter().map(String::as_str));
    cargo(&root, &test)
}

fn cargo(root: &std::path::Path, args: &[&str]) -> Result<()> {
    println!("+ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
