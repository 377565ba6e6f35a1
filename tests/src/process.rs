//! Processes started inside a simulated node or pod, with their output captured line by line.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static ECHO: AtomicBool = AtomicBool::new(true);

/// Whether processes' output lines are echoed to stderr (on by default, so a failing test shows
/// them; the demo turns it off to keep its screen readable).
pub fn set_echo(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

/// Where a spawned process goes.
pub(crate) struct Placement<'a> {
    /// `cgroup.procs` of the cgroup to join.
    pub cgroup: &'a Path,
    /// Network namespace to enter.
    pub netns: &'a Path,
    /// For pods: a directory (`/etc/netns/<ns>`) whose files are bind-mounted over the files of
    /// the same name in `/etc`, in a private mount namespace, as `ip netns exec` does.
    pub etc_overrides: Option<&'a Path>,
    /// Shown in errors and in front of echoed output lines.
    pub label: String,
}

/// How long [`PodProcess`]'s `Drop` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

pub(crate) fn spawn(mut command: Command, placement: Placement) -> Result<PodProcess> {
    // Everything the child needs is opened and allocated here, before fork: between fork and
    // exec only async-signal-safe system calls are allowed.
    let cgroup_procs = OpenOptions::new()
        .write(true)
        .open(placement.cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening cgroup {}", placement.cgroup.display()))?;
    let netns = File::open(placement.netns)
        .with_context(|| format!("opening network namespace {}", placement.netns.display()))?;
    let etc_mounts = placement.etc_overrides.map(etc_mounts).transpose()?;
    let setup = ChildSetup {
        cgroup_procs,
        netns,
        etc_mounts,
        parent: rustix::process::getpid(),
    };
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: `ChildSetup::run` makes only async-signal-safe system calls, on files and strings
    // the closure owns (they close when `command` drops, and the child's copies on exec); it
    // allocates nothing.
    unsafe { command.pre_exec(move || setup.run()) };
    let mut child =
        crate::command::retry_while_text_busy(|| command.spawn()).with_context(|| {
            format!(
                "spawning {} (joining the cgroup, entering the namespace or mounting /etc/hosts \
             may have failed)",
                placement.label
            )
        })?;

    let stdout = OutputLines::capture(child.stdout.take(), &placement.label, "stdout");
    let stderr = OutputLines::capture(child.stderr.take(), &placement.label, "stderr");
    Ok(PodProcess {
        child,
        label: placement.label,
        status: None,
        stdout,
        stderr,
    })
}

/// Bind mounts over `/etc` files, prepared before fork.
struct EtcMounts {
    /// (source, target) pairs.
    files: Vec<(CString, CString)>,
}

fn etc_mounts(dir: &Path) -> Result<EtcMounts> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let source = entry?.path();
        let target = Path::new("/etc").join(source.file_name().unwrap_or_default());
        // A bind mount needs an existing target.
        if target.exists() {
            let c_string = |path: &Path| CString::new(path.as_os_str().as_bytes());
            files.push((c_string(&source)?, c_string(&target)?));
        }
    }
    Ok(EtcMounts { files })
}

/// What the forked child does before exec.
struct ChildSetup {
    cgroup_procs: File,
    netns: File,
    etc_mounts: Option<EtcMounts>,
    parent: rustix::process::Pid,
}

impl ChildSetup {
    /// Runs in the forked child: only system calls, no allocation (rustix passes the prepared
    /// C strings and fds straight to the kernel).
    fn run(&self) -> io::Result<()> {
        // cgroup v2 reads "0" as "the writing process".
        if rustix::io::write(&self.cgroup_procs, b"0")? != 1 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rustix::thread::move_into_link_name_space(
            self.netns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        if let Some(mounts) = &self.etc_mounts {
            // A private mount namespace whose mounts stay invisible to the host, while host
            // mounts still propagate in (rslave), as `ip netns exec` does.
            // SAFETY: only NEWNS: the file descriptor table stays shared, which is what makes
            // `unshare` unsafe in general.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
            rustix::mount::mount_change(
                c"/",
                rustix::mount::MountPropagationFlags::REC
                    | rustix::mount::MountPropagationFlags::DOWNSTREAM,
            )?;
            for (source, target) in &mounts.files {
                rustix::mount::mount_bind(source.as_c_str(), target.as_c_str())?;
            }
        }
        // The kernel kills the child when the spawning *thread* exits, so nothing outlives a
        // test that is killed or that spawned from a short-lived thread.
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        // The parent may have died before the death signal was set.
        if rustix::process::getppid() != Some(self.parent) {
            return Err(rustix::io::Errno::SRCH.into());
        }
        Ok(())
    }
}

/// A process running in a pod or on the node. On drop it gets SIGTERM, then SIGKILL after a grace
/// period, and is reaped. Its stdout and stderr are always captured (see [`OutputLines`]) and also
/// echoed to the test's output, prefixed with its label, so a failing test shows them.
pub struct PodProcess {
    child: Child,
    label: String,
    status: Option<ExitStatus>,
    stdout: Arc<OutputLines>,
    stderr: Arc<OutputLines>,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The program and where it runs, e.g. `probe@client`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn stdout(&self) -> &OutputLines {
        &self.stdout
    }

    pub fn stderr(&self) -> &OutputLines {
        &self.stderr
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`). Fails if the process has already been reaped.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if self.try_status()?.is_some() {
            bail!("{} has already exited", self.label);
        }
        // Not reaped yet, so the pid still names our child (at worst a zombie).
        let pid = rustix::process::Pid::from_child(&self.child);
        let signal = rustix::process::Signal::from_named_raw(signal)
            .with_context(|| format!("signal {signal} is not one of the named signals"))?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("signalling {}", self.label))
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit and for its output to be fully read. Use for
    /// commands that finish on their own (`getent`, `curl`, `probe echo-client`).
    pub fn finish(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let Some(status) = self.wait_timeout(timeout)? else {
            bail!(
                "{} still running after {timeout:?}; stderr:\n{}",
                self.label,
                self.stderr.text()
            );
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // Output stays open if the process left children holding it; what was read so far is
        // still there, so this is not an error.
        self.stdout
            .wait_for_eof(left.max(Duration::from_millis(100)));
        self.stderr.wait_for_eof(Duration::from_millis(100));
        Ok(status)
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; returns how it ended, once
    /// what it wrote last has been read (its reader threads may lag behind the exit).
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let status = self.ended(grace)?;
        // Output stays open if the process left children holding it: not waited for long.
        self.stdout.wait_for_eof(Duration::from_millis(100));
        self.stderr.wait_for_eof(Duration::from_millis(100));
        Ok(status)
    }

    fn ended(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        // kill() fails only when the process is already reaped, which it is not.
        let _ = self.child.kill();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Err(error) = self.stop(STOP_GRACE) {
            eprintln!("stopping {}: {error:#}", self.label);
        }
    }
}

/// The lines a process has written to one of its outputs so far, filled by a reader thread as
/// they come. Lines are kept (they are never consumed), so every `wait_for_*` looks at all of
/// them from the start.
pub struct OutputLines {
    label: String,
    state: Mutex<Lines>,
    changed: Condvar,
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    eof: bool,
}

impl OutputLines {
    fn capture(pipe: Option<impl Read + Send + 'static>, label: &str, stream: &str) -> Arc<Self> {
        let output = Arc::new(Self {
            label: format!("{label} {stream}"),
            state: Mutex::new(Lines::default()),
            changed: Condvar::new(),
        });
        let Some(pipe) = pipe else {
            output.push_eof();
            return output;
        };
        let feed = Arc::clone(&output);
        // Not joined: it ends at EOF, which comes when the process and its children are gone.
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        if ECHO.load(Ordering::Relaxed) {
                            eprintln!("[{}] {text}", feed.label);
                        }
                        feed.state.lock().unwrap().lines.push(text.to_owned());
                        feed.changed.notify_all();
                    }
                }
            }
            feed.push_eof();
        });
        output
    }

    fn push_eof(&self) {
        self.state.lock().unwrap().eof = true;
        self.changed.notify_all();
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// All lines so far, joined with newlines.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Every line so far that parses as JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        let state = self.state.lock().unwrap();
        state
            .lines
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Whether the process has closed this output (normally: it has exited).
    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap().eof
    }

    /// Waits up to `timeout` for the output to be closed; returns whether it was.
    pub fn wait_for_eof(&self, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |state| !state.eof)
            .unwrap();
        state.eof
    }

    /// The first line matching `matches`, waiting up to `timeout` for it to be written.
    pub fn wait_for_line(
        &self,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let mut found = self.wait_for_lines(1, matches, timeout)?;
        Ok(found.swap_remove(0))
    }

    /// The first `count` lines matching `matches`, waiting up to `timeout` for them.
    pub fn wait_for_lines(
        &self,
        count: usize,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            let found: Vec<String> = state
                .lines
                .iter()
                .filter(|line| matches(line))
                .take(count)
                .cloned()
                .collect();
            if found.len() == count {
                return Ok(found);
            }
            let now = Instant::now();
            if state.eof || now >= deadline {
                let why = if state.eof {
                    "the output was closed (process exited?)".to_owned()
                } else {
                    format!("timed out after {timeout:?}")
                };
                let tail = state.lines.len().saturating_sub(20);
                bail!(
                    "[{}] found {} of {count} matching lines: {why}; last lines:\n{}",
                    self.label,
                    found.len(),
                    state.lines[tail..].join("\n")
                );
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// The first line that is a JSON value matching `matches`; other lines are skipped.
    pub fn wait_for_json(
        &self,
        matches: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let line = self.wait_for_line(
            |line| parse_json(line).is_some_and(|value| matches(&value)),
            timeout,
        )?;
        Ok(parse_json(&line).expect("matched lines parse"))
    }

    /// The first `count` JSON lines matching `matches`.
    pub fn wait_for_json_lines(
        &self,
        count: usize,
        matches: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        let lines = self.wait_for_lines(
            count,
            |line| parse_json(line).is_some_and(|value| matches(&value)),
            timeout,
        )?;
        Ok(lines
            .iter()
            .map(|line| parse_json(line).expect("matched lines parse"))
            .collect())
    }
}

fn parse_json(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}
