//! `cargo xtask demo --steps`: the whole tutorial unattended, one table row per step.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use mesh_tests::tutorial::{steps, Outcome, Pace, Step, World};

const WIDTHS: [usize; 4] = [34, 60, 54, 22];

pub fn run(world: &dyn World, stop: &AtomicBool) -> Result<()> {
    let steps = steps(Pace::Quick);
    println!("\nThe tutorial's steps, unattended (mesh-agent = target/debug/mesh-agent; files under deploy/examples/; kubectl -n servicemesh-apps):\n");
    print_row(["step", "command (ours)", "showed", "expected"], "");
    let mut failed = 0;
    for step in &steps {
        if stop.load(Ordering::SeqCst) {
            bail!("stopped by Ctrl-C");
        }
        let outcome = world.run_step(step);
        if !matches!(outcome, Ok(Outcome { passed: true, .. })) {
            failed += 1;
        }
        print_step(world, step, outcome);
    }
    println!();
    if failed > 0 {
        bail!(
            "{failed} of {} steps did not behave as the tutorial says",
            steps.len()
        );
    }
    println!("every step behaved as the tutorial says");
    Ok(())
}

/// The step's row, with each further command on a line of its own under the first.
fn print_step(world: &dyn World, step: &Step, outcome: Result<Outcome>) {
    let commands: Vec<String> = step
        .actions
        .iter()
        .map(|a| short(&world.command(a)))
        .collect();
    let first = commands
        .first()
        .map_or("curl localhost:8080/service-a", String::as_str);
    let (shown, mark) = match &outcome {
        Ok(outcome) => (
            outcome.shown.clone(),
            if outcome.passed { "✔" } else { "✘" },
        ),
        Err(error) => (format!("failed: {error:#}"), "✘"),
    };
    print_row([step.name, first, &shown, step.expected], mark);
    for command in commands.iter().skip(1) {
        print_row(["", command, "", ""], "");
    }
    if let Ok(outcome) = &outcome {
        if !outcome.passed && !outcome.error_samples.is_empty() {
            println!("    e.g. {:?}", outcome.error_samples);
        }
    }
}

fn print_row(cells: [&str; 4], mark: &str) {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(WIDTHS) {
        line += &format!("{cell:<width$}  ");
    }
    line += mark;
    println!("{}", line.trim_end());
}

/// The table's form of a command: the agent binary, example folder and namespace are said once
/// above.
fn short(command: &str) -> String {
    command
        .replace("target/debug/mesh-agent", "mesh-agent")
        .replace("deploy/examples/", "")
        .replace("kubectl -n servicemesh-apps", "kubectl")
}
