//! `mesh-agent stat` as the tests run it: against an agent's admin socket, its table read back.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::Agent;

/// Starts `mesh-agent stat --seconds N` against `agent`; its table is on its stdout once it ends.
pub fn start(agent: &Agent, seconds: u32) -> Result<Child> {
    Command::new(crate::agent_binary()?)
        .args(["stat", "--seconds", &seconds.to_string(), "--admin-socket"])
        .arg(agent.admin_socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mesh-agent stat")
}

/// The table `stat` printed, once it has ended.
pub fn table(stat: Child) -> Result<String> {
    let out = stat.wait_with_output()?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "mesh-agent stat failed: {table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(table)
}

/// A row of the table: SERVICE VERSION RPS SHARE SUCCESS P50 P99, each column as printed.
pub fn row(table: &str, service: &str, version: &str) -> Option<Vec<String>> {
    table
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|columns| columns.len() == 7 && columns[0] == service && columns[1] == version)
}

/// A percentage column's value (`89.9%` → 89.9).
pub fn percent(column: &str) -> f64 {
    column.trim_end_matches('%').parse().unwrap_or(f64::NAN)
}
