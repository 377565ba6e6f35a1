//! CPU time and memory as the kernel accounts them: per core (`/proc/stat`), for the node's cgroup
//! (`cpu.stat`), per process (`/proc/PID/task/*/schedstat`) and resident memory (`status`).

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// `/proc/stat` counts in USER_HZ, which is 100 on every Linux architecture we run on.
const TICK: Duration = Duration::from_millis(10);

/// One core's counters at an instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreTimes {
    /// Time spent by tasks (user, nice, system).
    pub tasks: Duration,
    /// Time in interrupts and softirqs: packet processing, charged to no task.
    pub interrupts: Duration,
}

impl CoreTimes {
    pub fn busy(&self) -> Duration {
        self.tasks + self.interrupts
    }

    pub fn since(&self, earlier: &CoreTimes) -> CoreTimes {
        CoreTimes {
            tasks: self.tasks.saturating_sub(earlier.tasks),
            interrupts: self.interrupts.saturating_sub(earlier.interrupts),
        }
    }
}

/// Every core's counters, indexed by CPU number.
pub fn cores() -> Result<Vec<CoreTimes>> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut cores = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        // The aggregate line is `cpu  ...`; per-core lines are `cpuN ...`.
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| TICK * fields.get(i).copied().unwrap_or(0) as u32;
        // user nice system idle iowait irq softirq steal ...
        cores.push(CoreTimes {
            tasks: field(0) + field(1) + field(2),
            interrupts: field(5) + field(6),
        });
    }
    Ok(cores)
}

/// CPU time used by every process of the cgroup so far (`usage_usec`).
pub fn cgroup_usage(cgroup: &Path) -> Result<Duration> {
    let path = cgroup.join("cpu.stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let usec = text
        .lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|value| value.trim().parse().ok())
        .context("cpu.stat has no usage_usec")?;
    Ok(Duration::from_micros(usec))
}

/// CPU time of all threads of `pid` so far, in nanoseconds precision (schedstat), unlike the
/// 10 ms ticks of `/proc/PID/stat` which are too coarse for a few seconds at 1,000 rps.
pub fn process_time(pid: u32) -> Result<Duration> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = Duration::ZERO;
    for entry in fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        if let Ok(text) = fs::read_to_string(path) {
            let ns = text
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse().ok())
                .unwrap_or(0);
            total += Duration::from_nanos(ns);
        }
    }
    Ok(total)
}

/// (VmRSS, VmHWM) of `pid` in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}
