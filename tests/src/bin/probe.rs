//! `probe`: the small client and servers that end-to-end tests run inside pods.
//!
//! Every subcommand prints JSON lines on stdout (one event a line) so tests can parse them;
//! servers print `{"listening":"ADDR"}` once they accept connections.
//!
//! ```text
//! probe echo-server --listen ADDR
//! probe echo-client --to ADDR --conns N --bytes M [--seed S] [--timeout-secs T]
//! probe http-server --listen ADDR --body TEXT
//! ```

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("usage: probe echo-server|echo-client|http-server [--option value]...");
        return ExitCode::from(2);
    };
    let result = Options::parse(rest).and_then(|options| match command.as_str() {
        "echo-server" => echo_server(&options),
        "echo-client" => echo_client(&options),
        "http-server" => http_server(&options),
        other => bail!("unknown subcommand {other:?}"),
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("probe {command}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` pairs.
struct Options(HashMap<String, String>);

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
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
        Ok(Self(map))
    }

    fn required(&self, name: &str) -> Result<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("--{name} is required"))
    }

    fn number(&self, name: &str, default: Option<u64>) -> Result<u64> {
        match (self.0.get(name), default) {
            (Some(value), _) => value
                .parse()
                .with_context(|| format!("--{name}: {value:?} is not a number")),
            (None, Some(default)) => Ok(default),
            (None, None) => bail!("--{name} is required"),
        }
    }
}

fn listen(options: &Options) -> Result<TcpListener> {
    let addr = options.required("listen")?;
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    println!(
        "{}",
        json!({ "listening": listener.local_addr()?.to_string() })
    );
    Ok(listener)
}

fn echo_server(options: &Options) -> Result<ExitCode> {
    let listener = listen(options)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let echoed = stream
                .try_clone()
                .and_then(|mut reader| io::copy(&mut reader, &mut stream));
            // Half-close so the client sees EOF after the last echoed byte.
            let _ = stream.shutdown(Shutdown::Write);
            if let Err(error) = echoed {
                eprintln!("echo-server: {error}");
            }
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn echo_client(options: &Options) -> Result<ExitCode> {
    let to: SocketAddr = options
        .required("to")?
        .parse()
        .context("--to must be IP:PORT")?;
    let conns = options.number("conns", Some(1))? as usize;
    let bytes = options.number("bytes", None)?;
    let seed = options.number("seed", Some(1))?;
    let timeout = Duration::from_secs(options.number("timeout-secs", Some(60))?);

    // All connections are open at the same time before any data moves, so a proxy in between
    // really handles `conns` concurrent connections.
    let all_connected = Arc::new(Barrier::new(conns));
    let workers: Vec<_> = (0..conns)
        .map(|conn| {
            let all_connected = Arc::clone(&all_connected);
            thread::spawn(move || {
                let stream = TcpStream::connect_timeout(&to, timeout);
                all_connected.wait();
                echo_once(conn, stream, bytes, seed, timeout)
            })
        })
        .collect();

    let mut ok = 0;
    for worker in workers {
        let report = worker.join().expect("connection thread panicked");
        ok += usize::from(report["ok"] == true);
        println!("{report}");
    }
    println!(
        "{}",
        json!({ "summary": true, "conns": conns, "ok": ok, "failed": conns - ok })
    );
    Ok(if ok == conns {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends `bytes` seeded random bytes on one connection while reading the echo, and reports both
/// hashes.
fn echo_once(
    conn: usize,
    stream: io::Result<TcpStream>,
    bytes: u64,
    seed: u64,
    timeout: Duration,
) -> serde_json::Value {
    let mut local_port = None;
    let result = stream.and_then(|stream| {
        local_port = Some(stream.local_addr()?.port());
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut writer = stream.try_clone()?;
        // Write on a second thread: reading only after writing everything would deadlock once
        // both directions' buffers are full.
        let sender = thread::spawn(move || -> io::Result<String> {
            let mut random = SplitMix64(seed ^ (conn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut hash = Sha256::new();
            let mut chunk = vec![0; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let len = left.min(chunk.len() as u64) as usize;
                random.fill(&mut chunk[..len]);
                hash.update(&chunk[..len]);
                writer.write_all(&chunk[..len])?;
                left -= len as u64;
            }
            writer.shutdown(Shutdown::Write)?;
            Ok(hex(&hash.finalize()))
        });
        let mut reader = stream;
        let mut hash = Sha256::new();
        let mut received = 0u64;
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            received += n as u64;
        }
        let sent = sender.join().expect("sender thread panicked")?;
        Ok((sent, hex(&hash.finalize()), received))
    });
    match result {
        Ok((sent, recv, received)) => json!({
            "conn": conn,
            "local_port": local_port,
            "sent_sha256": sent,
            "recv_sha256": recv,
            "recv_bytes": received,
            "ok": sent == recv && received == bytes,
        }),
        Err(error) => json!({
            "conn": conn,
            "local_port": local_port,
            "ok": false,
            "error": error.to_string(),
        }),
    }
}

fn http_server(options: &Options) -> Result<ExitCode> {
    let body: Arc<str> = options.required("body")?.into();
    let listener = listen(options)?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let body = Arc::clone(&body);
        thread::spawn(move || {
            if let Err(error) = serve_http(stream, &body) {
                eprintln!("http-server: {error}");
            }
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// Answers every request on one (keep-alive) connection with 200 and `body`.
fn serve_http(stream: TcpStream, body: &str) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        io::copy(
            &mut (&mut reader).take(content_length as u64),
            &mut io::sink(),
        )?;
        let connection = if close { "close" } else { "keep-alive" };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             x-peer: {peer}\r\nconnection: {connection}\r\n\r\n{body}",
            body.len()
        )?;
        if close {
            return Ok(());
        }
    }
}

/// A tiny seeded generator: the bytes only need to be reproducible and not trivially regular.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
