//! The agent refuses to start, with one clear message and a failing exit code, when the host
//! lacks what it needs. Each missing piece is simulated for real (another uid, a mount namespace
//! without cgroup v2). Needs root, as the agent does.

use std::{
    ffi::CString,
    os::unix::process::CommandExt,
    process::{Command, Output},
};

fn agent() -> Command {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "these tests simulate missing privileges and mounts and must run as root"
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
    command.args(["run", "--admin", "127.0.0.1:0"]);
    command
}

fn assert_refused(output: Output, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in: {stderr}"
    );
    assert!(
        !stderr.contains("attached"),
        "something was attached: {stderr}"
    );
}

#[test]
fn refuses_to_run_without_root() {
    // A copy where the other uid may run it: the checkout may sit in a directory only root can
    // enter (`mktemp -d` makes them 0700).
    use std::os::unix::fs::PermissionsExt;
    let copy = std::env::temp_dir().join(format!("mesh-agent-preflight-{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_mesh-agent"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let command = agent();
    let output = Command::new(&copy)
        .args(command.get_args())
        .uid(65534)
        .gid(65534)
        .output();
    let _ = std::fs::remove_file(&copy);
    assert_refused(output.unwrap(), "must run as root");
}

#[test]
fn refuses_a_cgroup_that_is_not_cgroup_v2() {
    let output = agent().args(["--cgroup", "/tmp"]).output().unwrap();
    assert_refused(output, "/tmp is not a directory of a cgroup v2 hierarchy");
}

#[test]
fn refuses_to_run_without_a_cgroup_v2_mount() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let targets: Vec<CString> = mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| CString::new(fields[1]).unwrap())
        })
        .collect();
    assert!(
        !targets.is_empty(),
        "this host has no cgroup v2 mount to hide"
    );
    let root = CString::new("/").unwrap();
    let mut command = agent();
    // SAFETY: the closure only makes raw syscalls on strings prepared before fork.
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for target in &targets {
                if libc::umount2(target.as_ptr(), libc::MNT_DETACH) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    assert_refused(output, "no cgroup v2 hierarchy is mounted");
}
