//! Builds kube-apiserver, kube-controller-manager and kube-scheduler once from Debian bookworm's
//! `kubernetes` source package and caches them under `~/.cache/mesh/kubernetes-<version>/bin`.
//!
//! No registry here serves Kubernetes as Go modules or binaries; bookworm's source package is the
//! full 1.20.2 tree with `vendor/` (`/work/shared/docs/kubernetes-control-plane.md` has the facts).
//! The recipe is Kubernetes 1.20's own (`hack/`, `Makefile.generated_files`) done by hand: GOPATH
//! mode, `openapi-gen` over the tree's API packages, version stamps through `-ldflags -X`, plus
//! one repair: the vendored `reflect2` 1.0.1 breaks with Go ≥ 1.18, so Debian's 1.0.2 replaces it.
//!
//! Only the three binaries are kept (~330 MB); the source, GOPATH and Go build cache (~2 GB) live
//! in `build/` next to them while building and are removed once the binaries are in place. A
//! failed build keeps `build/`, so a retry reuses the compiled packages.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::command::stdout_of;

/// Upstream version of the tree; the cache directory is named after it.
pub const KUBERNETES_VERSION: &str = "1.20.2";
/// The Debian source package version that carries it (bookworm main).
const DEBIAN_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// Where bookworm's sources are; only a private `deb-src` list points here.
const DEBIAN_SOURCES: &str = "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                              http://deb.debian.org/debian bookworm main";
/// Debian packages the build and the control plane need: Go 1.19 (bookworm's newest), reflect2
/// 1.0.2 for the swap, etcd 3.4 to store the API server's objects, and dpkg-source to unpack the
/// source package and apply its patches.
const PACKAGES: [&str; 4] = [
    "golang-1.19-go",
    "golang-github-modern-go-reflect2-dev",
    "etcd-server",
    "dpkg-dev",
];
const GOROOT: &str = "/usr/lib/go-1.19";
const GOROOT_BIN: &str = "/usr/lib/go-1.19/bin";
const GO: &str = "/usr/lib/go-1.19/bin/go";
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
const ETCD: &str = "/usr/bin/etcd";
/// The tree's import path in GOPATH mode.
const KUBE_PACKAGE: &str = "k8s.io/kubernetes";

/// The components built here, by name (`cmd/<name>` in the tree).
pub const COMPONENTS: [&str; 3] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// Paths of the control plane's programs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
}

impl Binaries {
    fn in_dir(bin: &Path) -> Self {
        Self {
            etcd: PathBuf::from(ETCD),
            kube_apiserver: bin.join(COMPONENTS[0]),
            kube_controller_manager: bin.join(COMPONENTS[1]),
            kube_scheduler: bin.join(COMPONENTS[2]),
        }
    }

    fn all_exist(&self) -> bool {
        [
            &self.etcd,
            &self.kube_apiserver,
            &self.kube_controller_manager,
            &self.kube_scheduler,
        ]
        .iter()
        .all(|path| path.is_file())
    }
}

/// `~/.cache/mesh` (or `$XDG_CACHE_HOME/mesh`), as xtask's other tools use.
fn cache_root() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("mesh"))
}

/// `~/.cache/mesh/kubernetes-<version>`.
pub fn cache_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join(format!("kubernetes-{KUBERNETES_VERSION}")))
}

/// The control plane's binaries, built first if they are not cached (tens of minutes on a busy
/// 2-core machine; progress goes to stderr). Safe to call from several threads and processes at
/// once: one builds, the others wait for it.
pub fn ensure_binaries() -> Result<Binaries> {
    let cache = cache_dir()?;
    let binaries = Binaries::in_dir(&cache.join("bin"));
    if binaries.all_exist() {
        return Ok(binaries);
    }
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock_path = cache.with_extension("lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        progress(format_args!(
            "another process is building Kubernetes {KUBERNETES_VERSION}; waiting for it"
        ));
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    crate::packages::ensure(&PACKAGES, |line| progress(format_args!("{line}")))?;
    if !binaries.all_exist() {
        build(&cache).with_context(|| {
            format!(
                "building Kubernetes {KUBERNETES_VERSION} from Debian's source package \
                 (the work directory {} is kept for a retry)",
                cache.join("build").display()
            )
        })?;
    }
    ensure!(
        binaries.all_exist(),
        "the build finished but {binaries:?} are not all there"
    );
    Ok(binaries)
}

/// Prints one progress line of the control plane's build or start.
pub(crate) fn progress(line: std::fmt::Arguments) {
    eprintln!("control plane: {line}");
}

/// The build, step by step, in `cache/build`; the binaries land in `cache/bin`.
fn build(cache: &Path) -> Result<()> {
    let started = Instant::now();
    progress(format_args!(
        "building kube-apiserver, kube-controller-manager and kube-scheduler \
         {KUBERNETES_VERSION} into {} (once: about 10 minutes on 2 idle cores, 25 on busy ones)",
        cache.display()
    ));
    let work = cache.join("build");
    let tree = fetch_source(&work)?;
    swap_reflect2(&tree)?;

    // GOPATH mode, as Kubernetes 1.20's hack/ builds: module mode with -mod=vendor asks for
    // go.mod updates. The tree is linked into a GOPATH of its own.
    let gopath = work.join("gopath");
    let link = gopath.join("src").join(KUBE_PACKAGE);
    fs::create_dir_all(link.parent().context("GOPATH link has a parent")?)?;
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(&tree, &link)?;
    let go = GoBuild {
        gopath,
        gocache: work.join("gocache"),
        tree: link,
    };

    let step = Instant::now();
    let openapi_gen = work.join("openapi-gen");
    go.build(
        &["-o", path_str(&openapi_gen)?],
        &[&format!(
            "{KUBE_PACKAGE}/vendor/k8s.io/kube-openapi/cmd/openapi-gen"
        )],
    )?;
    let inputs = openapi_input_packages(&tree)?;
    let mut generate = Command::new(&openapi_gen);
    go.environment(&mut generate);
    generate
        .arg("--input-dirs")
        .arg(inputs.join(","))
        .args([
            "--output-package",
            &format!("{KUBE_PACKAGE}/pkg/generated/openapi"),
        ])
        .args(["--output-file-base", "zz_generated.openapi"])
        .args([
            "--go-header-file",
            "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
        ])
        // Known API rule violations go to a report instead of failing the generation, as
        // Kubernetes' Makefile does (it then compares the report with its exception list).
        .arg("--report-filename")
        .arg(work.join("api-violations.report"));
    stdout_of(&mut generate)?;
    progress(format_args!(
        "openapi-gen built and run over {} API packages ({:.0} s)",
        inputs.len(),
        step.elapsed().as_secs_f64()
    ));

    let step = Instant::now();
    let out = work.join("out");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let packages: Vec<String> = COMPONENTS
        .iter()
        .map(|name| format!("{KUBE_PACKAGE}/cmd/{name}"))
        .collect();
    let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
    // One `go build` for the three: they share most of their packages.
    go.build(
        &[
            "-ldflags",
            &version_ldflags(),
            "-o",
            &format!("{}/", path_str(&out)?),
        ],
        &packages,
    )?;
    progress(format_args!(
        "compiled {} ({:.0} s)",
        COMPONENTS.join(", "),
        step.elapsed().as_secs_f64()
    ));

    let bin = cache.join("bin");
    let _ = fs::remove_dir_all(&bin);
    fs::rename(&out, &bin).with_context(|| format!("moving the binaries to {}", bin.display()))?;
    let step = Instant::now();
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    progress(format_args!(
        "removed the source and Go's build cache ({:.0} s)",
        step.elapsed().as_secs_f64()
    ));
    progress(format_args!(
        "Kubernetes {KUBERNETES_VERSION} built and cached in {} ({:.0} s in all)",
        bin.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Downloads bookworm's `kubernetes` source package into `work/source` with a private apt
/// sources list and state directories (the system's apt configuration is not touched), and
/// unpacks it with its Debian patches applied. Returns the tree.
fn fetch_source(work: &Path) -> Result<PathBuf> {
    let started = Instant::now();
    let apt = work.join("apt");
    fs::create_dir_all(apt.join("lists/partial"))?;
    fs::create_dir_all(apt.join("cache/archives/partial"))?;
    let sources = apt.join("sources.list");
    fs::write(&sources, format!("{DEBIAN_SOURCES}\n"))?;
    let private = |command: &mut Command| -> Result<()> {
        command
            .arg("-q")
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", path_str(&sources)?))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!(
                "Dir::State::Lists={}",
                path_str(&apt.join("lists"))?
            ))
            .arg("-o")
            .arg(format!("Dir::Cache={}", path_str(&apt.join("cache"))?));
        Ok(())
    };
    let mut update = Command::new("apt-get");
    private(&mut update)?;
    stdout_of(update.arg("update"))
        .context("reading bookworm's source index from deb.debian.org")?;

    let source = work.join("source");
    let _ = fs::remove_dir_all(&source);
    fs::create_dir_all(&source)?;
    let mut get = Command::new("apt-get");
    private(&mut get)?;
    get.current_dir(&source)
        .arg("source")
        .arg(format!("kubernetes={DEBIAN_VERSION}"));
    if let Err(error) = stdout_of(&mut get) {
        let mut available = Command::new("apt-cache");
        private(&mut available)?;
        let available = available
            .args(["showsrc", "--only-source", "kubernetes"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        let versions: Vec<&str> = available
            .lines()
            .filter_map(|line| line.strip_prefix("Version: "))
            .collect();
        return Err(error).context(format!(
            "downloading the kubernetes source package {DEBIAN_VERSION} (bookworm serves: \
             {versions:?}; update DEBIAN_VERSION in {} if it moved on)",
            file!()
        ));
    }
    let mut trees = fs::read_dir(&source)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir());
    let tree = trees
        .next()
        .context("apt-get source unpacked nothing (dpkg-source missing?)")?;
    ensure!(
        trees.next().is_none(),
        "apt-get source unpacked more than one tree in {}",
        source.display()
    );
    progress(format_args!(
        "source package kubernetes {DEBIAN_VERSION} downloaded, unpacked and patched ({:.0} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(tree)
}

/// Replaces the vendored reflect2 1.0.1 (which breaks with Go ≥ 1.18) with Debian's 1.0.2.
fn swap_reflect2(tree: &Path) -> Result<()> {
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    fs::create_dir_all(&vendored)?;
    for entry in fs::read_dir(REFLECT2).with_context(|| format!("reading {REFLECT2}"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .context("file without name")?
            .to_string_lossy();
        // GOPATH mode reads no go.mod; its tests would pull in test-only packages.
        if path.is_file() && name != "go.mod" && !name.ends_with("_test.go") {
            fs::copy(&path, vendored.join(&*name))?;
        }
    }
    Ok(())
}

/// The Go toolchain in GOPATH mode over the tree.
struct GoBuild {
    gopath: PathBuf,
    gocache: PathBuf,
    /// The tree, as seen through GOPATH (`$GOPATH/src/k8s.io/kubernetes`).
    tree: PathBuf,
}

impl GoBuild {
    /// GOPATH mode with Go 1.19 first on PATH: the generators (gengo) find the standard library
    /// through `go` too.
    fn environment(&self, command: &mut Command) {
        let mut path = std::ffi::OsString::from(GOROOT_BIN);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        command
            .current_dir(&self.tree)
            // Go takes the working directory from $PWD when it names the same directory: this
            // keeps it inside GOPATH (the symbolic link), where imports resolve through vendor/.
            // The kernel's answer would be the tree's real path, outside GOPATH.
            .env("PWD", &self.tree)
            .env("PATH", path)
            .env("GOROOT", GOROOT)
            .env("GOPATH", &self.gopath)
            .env("GOCACHE", &self.gocache)
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0")
            // Nothing is downloaded: there is no Go module proxy to reach here anyway.
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOTOOLCHAIN", "local");
    }

    fn build(&self, flags: &[&str], packages: &[&str]) -> Result<()> {
        let mut command = Command::new(GO);
        self.environment(&mut command);
        command
            .arg("build")
            // Paths out of the binaries, and out of the build cache's keys.
            .arg("-trimpath")
            .args(flags)
            .args(packages);
        let started = Instant::now();
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {GO} (golang-1.19-go installed?)"))?;
        wait_with_heartbeat(child, &format!("go build {}", packages.join(" ")), started)
    }
}

/// Waits for a long-running child, printing a line every minute so logs show it is alive; on
/// failure, the error carries everything it printed.
fn wait_with_heartbeat(mut child: Child, what: &str, started: Instant) -> Result<()> {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut next_beat = Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() >= next_beat {
            progress(format_args!(
                "still compiling ({:.0} s)",
                started.elapsed().as_secs_f64()
            ));
            next_beat += Duration::from_secs(60);
        }
        thread::sleep(Duration::from_millis(500));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!("{what} failed ({status}):\n{stdout}{stderr}");
    }
    Ok(())
}

/// Reads a pipe to its end on a thread of its own, so the child never blocks on a full pipe.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            // A read error leaves what was read; the exit status says whether it failed.
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// The packages `openapi-gen` reads for `pkg/generated/openapi`, chosen as Kubernetes 1.20's
/// `Makefile.generated_files` does (`KUBE_OPENAPI_TAG_FILES`): every directory of the tree (not
/// `vendor/`, `_*` or `.*` at its top; `staging/src/X` counted as `vendor/X`) with a Go file
/// that has a `// +k8s:` tag line and mentions `+k8s:openapi-gen=`, except the code generator's
/// and the sample API server's.
fn openapi_input_packages(tree: &Path) -> Result<Vec<String>> {
    fn walk(dir: &Path, relative: &str, found: &mut BTreeSet<String>) -> Result<()> {
        let mut tagged = false;
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Like `find` without -L: symbolic links are not followed.
            let kind = entry.file_type()?;
            if kind.is_dir() {
                let top_level_skip = relative.is_empty()
                    && (name == "vendor" || name.starts_with('_') || name.starts_with('.'));
                if !top_level_skip {
                    let child = if relative.is_empty() {
                        name.clone()
                    } else {
                        format!("{relative}/{name}")
                    };
                    walk(&entry.path(), &child, found)?;
                }
            } else if kind.is_file() && name.ends_with(".go") && !tagged {
                let text = fs::read(entry.path())?;
                let text = String::from_utf8_lossy(&text);
                tagged = text.contains("+k8s:openapi-gen=")
                    && text.lines().any(|line| {
                        line.strip_prefix("//")
                            .is_some_and(|rest| rest.trim_start_matches(' ').starts_with("+k8s:"))
                    });
            }
        }
        if tagged {
            let package = match relative.strip_prefix("staging/src/") {
                Some(staged) => format!("vendor/{staged}"),
                None => relative.to_owned(),
            };
            let excluded = [
                "vendor/k8s.io/code-generator/",
                "vendor/k8s.io/sample-apiserver/",
            ]
            .iter()
            .any(|prefix| format!("{package}/").starts_with(prefix));
            if !excluded {
                found.insert(format!("{KUBE_PACKAGE}/{package}"));
            }
        }
        Ok(())
    }
    let mut found = BTreeSet::new();
    walk(tree, "", &mut found)?;
    ensure!(
        !found.is_empty(),
        "no package of {} asks for OpenAPI definitions: is it the Kubernetes tree?",
        tree.display()
    );
    Ok(found.into_iter().collect())
}

/// `-ldflags` that stamp the version into both packages that report it (`/version`, `--version`,
/// kubectl's skew check), as `hack/lib/version.sh` does.
fn version_ldflags() -> String {
    let (major, minor) = {
        let mut parts = KUBERNETES_VERSION.split('.');
        (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"))
    };
    let build_date = {
        let out = Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output();
        out.map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    // -s -w: no symbol table or DWARF (110 MB instead of 160 MB for kube-apiserver).
    let mut flags = String::from("-s -w");
    for package in ["client-go/pkg/version", "component-base/version"] {
        for (key, value) in [
            ("gitVersion", format!("v{KUBERNETES_VERSION}")),
            ("gitMajor", major.to_owned()),
            ("gitMinor", minor.to_owned()),
            ("gitTreeState", "archive".to_owned()),
            ("buildDate", build_date.clone()),
        ] {
            let _ = write!(
                flags,
                " -X {KUBE_PACKAGE}/vendor/k8s.io/{package}.{key}={value}"
            );
        }
    }
    flags
}

/// Runs a command with its output captured; on failure, the error carries that output.
fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_stamped_into_both_version_packages() {
        let flags = version_ldflags();
        for package in ["client-go/pkg/version", "component-base/version"] {
            for key in ["gitVersion=v1.20.2", "gitMajor=1", "gitMinor=20"] {
                let flag = format!("-X k8s.io/kubernetes/vendor/k8s.io/{package}.{key}");
                assert!(flags.contains(&flag), "{flag} missing from {flags}");
            }
        }
    }

    #[test]
    fn openapi_inputs_follow_the_makefile_rules() -> Result<()> {
        let tree = tempfile::tempdir()?;
        let file = |path: &str, text: &str| -> Result<()> {
            let path = tree.path().join(path);
            fs::create_dir_all(path.parent().unwrap())?;
            fs::write(path, text)?;
            Ok(())
        };
        let tagged = "// +k8s:openapi-gen=true\npackage x\n";
        file("pkg/apis/core/v1/doc.go", tagged)?;
        file("pkg/apis/untagged/doc.go", "package y\n")?;
        // A mention without a tag line, as in a comment's prose, does not count.
        file(
            "pkg/prose/doc.go",
            "/* see +k8s:openapi-gen= */\npackage z\n",
        )?;
        file("staging/src/k8s.io/api/apps/v1/doc.go", tagged)?;
        file("staging/src/k8s.io/code-generator/examples/doc.go", tagged)?;
        file("staging/src/k8s.io/sample-apiserver/apis/doc.go", tagged)?;
        file("vendor/k8s.io/api/apps/v1/doc.go", tagged)?;
        file("_output/local/doc.go", tagged)?;
        file(".git/doc.go", tagged)?;
        assert_eq!(
            openapi_input_packages(tree.path())?,
            [
                "k8s.io/kubernetes/pkg/apis/core/v1",
                "k8s.io/kubernetes/vendor/k8s.io/api/apps/v1",
            ]
        );
        Ok(())
    }
}
