//! CPU time and memory as the kernel accounts them: per core (`/proc/stat`), for the node's cgroup
//! (`cpu.stat`), per process (`/proc/PID/task/*/schedstat`, user and kernel time and context
//! switches from `stat` and `status`) and resident memory (`status`).

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

/// Where a process's CPU time went so far: user space and the kernel (`/proc/PID/stat`, all its
/// threads, in ticks), and how often its threads were switched out (`/proc/PID/task/*/status`).
/// Kernel time includes the softirqs run in its context: a write to a local socket carries the
/// packet through loopback or a veth into the receiver's socket before it returns.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessTimes {
    pub user: Duration,
    pub kernel: Duration,
    pub switches: u64,
}

impl ProcessTimes {
    pub fn read(pid: u32) -> Result<ProcessTimes> {
        let path = format!("/proc/{pid}/stat");
        let (user, kernel) =
            user_and_kernel(&fs::read_to_string(&path).with_context(|| format!("reading {path}"))?);
        let mut switches = 0;
        let tasks = format!("/proc/{pid}/task");
        for entry in fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            // A thread may exit between the listing and the read.
            let Ok(status) = fs::read_to_string(entry?.path().join("status")) else {
                continue;
            };
            switches += status
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|count| count.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        Ok(ProcessTimes {
            user,
            kernel,
            switches,
        })
    }

    /// The sum of several processes' times.
    pub fn of(pids: &[u32]) -> Result<ProcessTimes> {
        pids.iter().try_fold(ProcessTimes::default(), |sum, pid| {
            let times = ProcessTimes::read(*pid)?;
            Ok(ProcessTimes {
                user: sum.user + times.user,
                kernel: sum.kernel + times.kernel,
                switches: sum.switches + times.switches,
            })
        })
    }

    pub fn since(&self, earlier: &ProcessTimes) -> ProcessTimes {
        ProcessTimes {
            user: self.user.saturating_sub(earlier.user),
            kernel: self.kernel.saturating_sub(earlier.kernel),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }
}

/// utime and stime of a `/proc/PID/stat` line.
fn user_and_kernel(stat: &str) -> (Duration, Duration) {
    // The command name may hold spaces and parentheses: fields count from its last `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the name: state is field 3, utime 14 and stime 15.
    let ticks = |field: usize| {
        let value: u32 = fields
            .get(field - 3)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0);
        TICK * value
    };
    (ticks(14), ticks(15))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_kernel_time_are_read_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (mesh (agent) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 567 0 0 20 0 5 0 100 123456 789 18446744073709551615";
        assert_eq!(
            user_and_kernel(stat),
            (Duration::from_millis(12_340), Duration::from_millis(5_670))
        );
        assert_eq!(user_and_kernel("garbage"), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn this_process_has_spent_some_time_and_been_switched_out() {
        let before = ProcessTimes::read(std::process::id()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let after = ProcessTimes::read(std::process::id()).unwrap();
        assert!(after.switches > before.switches);
    }
}
