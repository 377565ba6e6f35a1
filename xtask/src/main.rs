//! Developer commands: `cargo xtask build-ebpf`, `cargo xtask test`, `cargo xtask demo`.

mod build_ebpf;
mod demo;
mod test;

use std::{path::Path, process};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer commands for the mesh", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the kernel programs (installs nightly's rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build everything and run every test: unit, integration and end-to-end (as root).
    /// Run the demo on a simulated node on this machine (needs root).
    Demo {
        /// Stop after this many requests instead of running until Ctrl-C.
        #[arg(long)]
        rounds: Option<u32>,
    },
    Test {
        /// Extra arguments passed to `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run().map(|_| ()),
        Command::Demo { rounds } => demo::run(rounds),
        Command::Test { cargo_args } => test::run(&cargo_args),
    }
}

/// Runs the cargo that runs xtask, in `root`.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    println!("+ cargo {}", args.join(" "));
    let status = process::Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
