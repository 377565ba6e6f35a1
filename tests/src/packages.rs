//! Debian packages the tests drive (the control plane's build, Prometheus), installed with
//! apt-get when missing, so a fresh machine of this kind needs nothing installed by hand.

use std::{process::Command, time::Instant};

use anyhow::{Context, Result};

use crate::command::stdout_of;

/// Installs those of `packages` that are missing (none when all are: this only asks dpkg),
/// telling `progress` what it does.
pub fn ensure(packages: &[&str], progress: impl Fn(&str)) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    progress(&format!("apt-get install {}", missing.join(" ")));
    let apt = |args: &[&str]| -> Result<()> {
        let mut command = Command::new("apt-get");
        command
            .args(["-q", "-y", "-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        stdout_of(&mut command).map(drop)
    };
    // A fresh machine's package lists may be empty or stale; the install says which.
    if apt(&[&["install", "--no-install-recommends"], &missing[..]].concat()).is_err() {
        apt(&["update"])?;
        apt(&[&["install", "--no-install-recommends"], &missing[..]].concat())
            .with_context(|| format!("installing {}", missing.join(" ")))?;
    }
    progress(&format!(
        "installed {} ({:.1} s)",
        missing.join(" "),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"installed")
}
