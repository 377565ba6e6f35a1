//! System calls of the proxy's processes, counted by `perf stat` on the kernel's
//! `raw_syscalls:sys_enter` tracepoint (every thread, exact, a few percent of overhead on the
//! counted processes). Where `perf` is missing or the tracepoint cannot be opened, the count is
//! absent and the report says so with a dash.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A `perf stat` attached to some processes until [`Counting::finish`].
pub struct Counting {
    perf: Child,
    output: PathBuf,
}

impl Counting {
    /// Starts counting the system calls of `pids` (all their threads); `None` without `perf`.
    pub fn start(pids: &[u32]) -> Option<Counting> {
        if pids.is_empty() {
            return None;
        }
        let output = std::env::temp_dir().join(format!("mesh-bench-syscalls-{}", pids[0]));
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-o"])
            .arg(&output)
            .args(["-p", &list.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Counting { perf, output })
    }

    /// Stops counting (perf prints its counts on SIGINT) and returns the system calls made since
    /// the start.
    pub fn finish(mut self) -> Option<u64> {
        let interrupted = Command::new("kill")
            .args(["-INT", &self.perf.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if !interrupted {
            let _ = self.perf.kill();
        }
        let exited = self.perf.wait().ok()?;
        let text = fs::read_to_string(&self.output).ok();
        let _ = fs::remove_file(&self.output);
        if !interrupted && !exited.success() {
            return None;
        }
        parse(&text?)
    }
}

impl Drop for Counting {
    /// A run that failed midway leaves no `perf` behind (after `finish` this finds it gone).
    fn drop(&mut self) {
        let _ = self.perf.kill();
        let _ = self.perf.wait();
    }
}

/// The count from `perf stat -x ,` output: `count,unit,event,...` on the event's line.
fn parse(text: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.contains("raw_syscalls:sys_enter"))
        .and_then(|line| line.split(',').next())
        .and_then(|count| count.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_the_count_of_the_event_line_and_nothing_from_an_uncounted_one() {
        let counted = "# started on Fri Dec  4 09:10:00 2026\n\n1554785,,raw_syscalls:sys_enter,10000503930,100.00,,\n";
        assert_eq!(parse(counted), Some(1_554_785));
        let uncounted = "<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n";
        assert_eq!(parse(uncounted), None);
        assert_eq!(parse(""), None);
    }
}
