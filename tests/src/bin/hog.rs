//! A hostile neighbour for the exhaustion tests, run inside a pod so the kernel redirect sends
//! its connections to the agent. Prints one JSON line per event on stdout.
//!
//! - `hog idle --target IP:PORT --silent N --half-header N --partial-preface N --idle-h2 N
//!   --idle-keepalive N [--host HOST] --wait-secs S`: opens the connections, each sending what
//!   its kind says and then nothing (`idle-keepalive`: one whole GET for HOST, whose answer it
//!   reads before it counts the connection open),
//!   prints `{"opened":…}`, then waits (at most S seconds) for the agent to close them and
//!   prints `{"closed":{kind:count},"open":{kind:count},"close_ms":{kind:[min,max]}}`.
//! - `hog keepalive --target IP:PORT --host HOST --count N --interval-ms MS`: one HTTP/1.1
//!   keep-alive connection, a GET every MS; prints `{"n":…,"status":…}` or `{"n":…,"error":…}`.
//! - `hog flood --target IP:PORT --count N --hold-secs S`: opens N connections as fast as it
//!   can (failures counted, not fatal), holds them S seconds, prints `{"connected":…}`.

use std::{
    collections::{BTreeMap, HashMap},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what a client sends right after the preface.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("usage: hog idle|keepalive|flood [--option value]...");
        return ExitCode::from(2);
    };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = options(rest).and_then(|options| {
        runtime.block_on(async {
            match command.as_str() {
                "idle" => idle(&options).await,
                "keepalive" => keepalive(&options).await,
                "flood" => flood(&options).await,
                other => bail!("unknown subcommand {other:?}"),
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hog {command}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

fn options(args: &[String]) -> Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let Some(name) = arg.strip_prefix("--") else {
            bail!("expected --option, got {arg:?}");
        };
        let value = args
            .next()
            .with_context(|| format!("--{name} needs a value"))?;
        map.insert(name.to_owned(), value.clone());
    }
    Ok(map)
}

fn get<'a>(options: &'a HashMap<String, String>, name: &str) -> Result<&'a str> {
    options
        .get(name)
        .map(String::as_str)
        .with_context(|| format!("--{name} is required"))
}

fn number(options: &HashMap<String, String>, name: &str, default: u64) -> Result<u64> {
    match options.get(name) {
        Some(value) => value
            .parse()
            .with_context(|| format!("--{name}: {value:?} is not a number")),
        None => Ok(default),
    }
}

/// The connection kinds and what each sends before going quiet.
fn kinds(host: &str) -> [(&'static str, Vec<Vec<u8>>); 5] {
    [
        ("silent", vec![]),
        (
            "half-header",
            vec![b"GET / HTTP/1.1\r\nHost: service-c\r\n".to_vec()],
        ),
        ("partial-preface", vec![b"PRI * HTTP/2.0\r\n".to_vec()]),
        ("idle-h2", vec![H2_PREFACE.to_vec(), H2_SETTINGS.to_vec()]),
        (
            "idle-keepalive",
            vec![format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()],
        ),
    ]
}

async fn idle(options: &HashMap<String, String>) -> Result<()> {
    let target = get(options, "target")?.to_owned();
    let host = options.get("host").map_or("service-c", String::as_str);
    let wait = Duration::from_secs(number(options, "wait-secs", 60)?);
    let start = Instant::now();
    // Opened a batch at a time, in parallel, so all are open at once well within the
    // timeouts being tested.
    let mut tasks = Vec::new();
    let mut batch = Vec::new();
    for (kind, sends) in kinds(host) {
        for _ in 0..number(options, kind, 0)? {
            batch.push(tokio::spawn(open(target.clone(), kind, sends.clone())));
            if batch.len() == 100 {
                for opening in batch.drain(..) {
                    tasks.push(opening.await??);
                }
            }
        }
    }
    for opening in batch {
        tasks.push(opening.await??);
    }
    println!(
        "{}",
        json!({"opened": tasks.len(), "open_ms": start.elapsed().as_millis() as u64})
    );
    let mut closed: BTreeMap<&str, u64> = BTreeMap::new();
    let mut close_ms: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut open: BTreeMap<&str, u64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + wait;
    for (kind, task) in tasks {
        let mut task = task;
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(after)) => {
                *closed.entry(kind).or_default() += 1;
                let ms = after.as_millis() as u64;
                let range = close_ms.entry(kind).or_insert((ms, ms));
                range.0 = range.0.min(ms);
                range.1 = range.1.max(ms);
            }
            _ => {
                task.abort();
                *open.entry(kind).or_default() += 1;
            }
        }
    }
    println!(
        "{}",
        json!({"closed": closed, "open": open, "close_ms": close_ms,
               "elapsed_ms": start.elapsed().as_millis() as u64})
    );
    Ok(())
}

/// Connects, sends `sends`, then reads (and drops) whatever the agent sends until it closes
/// the connection: returns the kind and a task whose result is how long after it began to
/// connect that was. Timed from before `connect`, since the agent's clocks start when it accepts, which may
/// be long before a loaded client's task runs again after its connect completed.
async fn open(
    target: String,
    kind: &'static str,
    sends: Vec<Vec<u8>>,
) -> Result<(&'static str, tokio::task::JoinHandle<Duration>)> {
    let opened = Instant::now();
    let mut stream = TcpStream::connect(&target)
        .await
        .with_context(|| format!("connect {target}"))?;
    for bytes in &sends {
        stream.write_all(bytes).await?;
    }
    if kind == "idle-keepalive" {
        // Answered before the next connection opens, so what stays is the idle connection,
        // not a request in flight (nor an upstream connection the agent opened for it).
        read_response(&mut stream).await?;
    }
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return opened.elapsed(),
                Ok(_) => {}
            }
        }
    });
    Ok((kind, closed))
}

async fn keepalive(options: &HashMap<String, String>) -> Result<()> {
    let target = get(options, "target")?;
    let host = get(options, "host")?;
    let count = number(options, "count", 10)?;
    let interval = Duration::from_millis(number(options, "interval-ms", 100)?);
    let mut stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    for n in 0..count {
        let answered = async {
            stream.write_all(request.as_bytes()).await?;
            read_response(&mut stream).await
        };
        let line = match tokio::time::timeout(Duration::from_secs(5), answered).await {
            Ok(Ok(status)) => json!({"n": n, "status": status}),
            Ok(Err(error)) => json!({"n": n, "error": error.to_string()}),
            Err(_) => json!({"n": n, "error": "no answer within 5 s"}),
        };
        println!("{line}");
        if line["error"].is_string() {
            // The connection is in an unknown state: stop here, the test sees why.
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
    Ok(())
}

/// Reads one response with a `Content-Length` body; returns its status.
async fn read_response(stream: &mut TcpStream) -> Result<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            bail!("closed before the response head ended");
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("the test's upstream always sends Content-Length")?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(status)
}

async fn flood(options: &HashMap<String, String>) -> Result<()> {
    let target = get(options, "target")?;
    let count = number(options, "count", 100)?;
    let hold = Duration::from_secs(number(options, "hold-secs", 3)?);
    let mut held = Vec::new();
    let mut failed = 0u64;
    for _ in 0..count {
        // Over the agent's limit the kernel still completes the handshake (the backlog),
        // so a connect can succeed and hang; give each a short bound.
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(target)).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => failed += 1,
        }
    }
    println!("{}", json!({"connected": held.len(), "failed": failed}));
    tokio::time::sleep(hold).await;
    Ok(())
}
