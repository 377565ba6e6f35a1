//! Control of a running demo from other terminals: `cargo xtask demo
//! crash|repair|scale|apply ...`
//! sends one line over `/run/mesh-demo/control.sock` and prints the one-line answer.
//!
//! The demo polls the socket between two requests of its loop and runs each command on its
//! main thread: pods die with the thread that spawned them, so scaling must happen there.

use std::{
    fmt,
    io::{BufRead, BufReader, ErrorKind, Write},
    os::unix::net::{UnixListener, UnixStream},
    str::FromStr,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::state;

/// A command for the running demo, one line on the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Crash(String),
    Repair(String),
    Scale(String, usize),
    /// `mesh-agent apply -f FILE` to every node's agent (local mode).
    Apply(String),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Crash(pod) => write!(f, "crash {pod}"),
            Command::Repair(pod) => write!(f, "repair {pod}"),
            Command::Scale(deployment, n) => write!(f, "scale {deployment} {n}"),
            Command::Apply(file) => write!(f, "apply {file}"),
        }
    }
}

impl FromStr for Command {
    type Err = anyhow::Error;

    fn from_str(line: &str) -> Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["crash", pod] => Ok(Command::Crash(pod.to_string())),
            ["repair", pod] => Ok(Command::Repair(pod.to_string())),
            ["scale", deployment, n] => Ok(Command::Scale(
                deployment.to_string(),
                n.parse().context("replicas must be a number")?,
            )),
            ["apply", file] => Ok(Command::Apply(file.to_string())),
            _ => bail!(
                "unknown command {line:?} (crash POD, repair POD, scale DEPLOYMENT N, apply FILE)"
            ),
        }
    }
}

/// The demo's end of the socket.
pub struct Server {
    listener: UnixListener,
}

impl Server {
    /// Binds the socket, refusing if another demo answers on it (a socket file left by a killed
    /// demo is replaced).
    pub fn bind() -> Result<Server> {
        let path = state::control_socket();
        if UnixStream::connect(&path).is_ok() {
            bail!(
                "another demo is running (it answers on {}); stop it first",
                path.display()
            );
        }
        std::fs::create_dir_all(state::RUN_DIR)?;
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        // Polled from the demo's loop, which must never block on it.
        listener.set_nonblocking(true)?;
        Ok(Server { listener })
    }

    /// Serves every connection waiting now, one command each, with `run` deciding the answer.
    pub fn serve_pending(&self, mut run: impl FnMut(&Command) -> Result<String>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(error) = serve_one(stream, &mut run) {
                        println!("» control: {error:#}");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(error) => {
                    println!("» control socket: {error}");
                    return;
                }
            }
        }
    }
}

fn serve_one(stream: UnixStream, run: &mut impl FnMut(&Command) -> Result<String>) -> Result<()> {
    stream.set_nonblocking(false)?;
    // A client that connects and says nothing must not stall the demo.
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim().is_empty() {
        // A demo starting elsewhere checks whether this one runs: it connects and hangs up.
        return Ok(());
    }
    let answer = match line.parse::<Command>().and_then(|command| run(&command)) {
        Ok(text) => format!("ok {text}"),
        Err(error) => format!("error {error:#}"),
    };
    // Shown in the demo's own stream too, so its screen tells what changed and when.
    println!("» {} → {answer}", line.trim());
    let answer = answer + "\n";
    (&stream).write_all(answer.as_bytes())?;
    Ok(())
}

/// `cargo xtask demo crash|repair|scale ...`: sends `command` to the running demo and prints
/// its answer. Fails when no demo runs or the demo reports an error.
pub fn send(command: &Command) -> Result<()> {
    let path = state::control_socket();
    let Ok(stream) = UnixStream::connect(&path) else {
        bail!(
            "no demo is running (nothing answers on {}); start one with `cargo xtask demo`",
            path.display()
        );
    };
    // Scaling up waits for the new replica to become healthy (Java compiles at start): up to
    // two minutes on a busy machine before the demo gives up and answers.
    stream.set_read_timeout(Some(Duration::from_secs(150)))?;
    (&stream).write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("reading the demo's answer")?;
    match answer.trim_end().split_once(' ') {
        Some(("ok", text)) => {
            println!("{text}");
            Ok(())
        }
        Some(("error", text)) => bail!("{text}"),
        _ => bail!("unexpected answer from the demo: {answer:?}"),
    }
}
