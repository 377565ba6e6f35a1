//! Developer commands: `cargo xtask build-ebpf`, `cargo xtask test`, `cargo xtask demo`.

mod build_ebpf;
mod test;

use anyhow::Result;
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
    Test {
        /// Extra arguments passed to `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run().map(|_| ()),
        Command::Test { cargo_args } => test::run(&cargo_args),
    }
}
