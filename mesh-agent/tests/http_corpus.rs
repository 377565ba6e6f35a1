//! The hostile HTTP corpus (`tests/data/http-corpus/`) through the real proxy in process: every
//! malformed or smuggling request is answered as Envoy answers it (400, 431 for a head too
//! large) and closes the connection, the upstream receives exactly the requests it should,
//! nothing panics and memory stays bounded; every malformed upstream response is answered 502
//! and no second response is ever passed on.

mod support;

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_agent::proxy::http::head_check::HeadChecker;
use support::{
    example, loopback, service, service_c_yaml, Backend, Mesh, SERVICE_C, UPSTREAM_PORT,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{timeout, Instant},
};

/// One corpus entry: its fields as written (`send`/`respond` decoded).
#[derive(Debug, Default)]
struct Case {
    name: String,
    bytes: Vec<u8>,
    eof: bool,
    close: bool,
    expect: String,
    upstream: String,
    upstream_host: Option<String>,
}

fn corpus(file: &str) -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/http-corpus")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut cases: Vec<Case> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix("=== ") {
            cases.push(Case {
                name: name.to_owned(),
                ..Case::default()
            });
            continue;
        }
        let case = cases
            .last_mut()
            .expect("a field before the first `=== name`");
        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
        match field {
            "send" | "respond" => case.bytes.extend(decode(&expand(value))),
            "eof" => case.eof = true,
            "close" => case.close = true,
            "expect" => case.expect = value.to_owned(),
            "upstream" => case.upstream = value.to_owned(),
            "upstream-host" => case.upstream_host = Some(value.to_owned()),
            _ => panic!("{}: unknown field {field:?}", case.name),
        }
    }
    cases
}

/// `<<N*TEXT>>`: TEXT repeated N times, `%` in it replaced by the repetition's index. Nests.
fn expand(text: &str) -> String {
    let Some(start) = text.find("<<") else {
        return text.to_owned();
    };
    // The matching `>>`: count nested openings.
    let (mut depth, mut at) = (0, start);
    let end = loop {
        if text[at..].starts_with("<<") {
            depth += 1;
            at += 2;
        } else if text[at..].starts_with(">>") {
            depth -= 1;
            if depth == 0 {
                break at;
            }
            at += 2;
        } else {
            at += text[at..].chars().next().expect("a closing >>").len_utf8();
        }
    };
    let (count, body) = text[start + 2..end].split_once('*').expect("<<N*TEXT>>");
    let count: usize = count.parse().expect("a repetition count");
    let body = expand(body);
    let mut out = text[..start].to_owned();
    for i in 0..count {
        out.push_str(&body.replace('%', &i.to_string()));
    }
    out.push_str(&expand(&text[end + 2..]));
    out
}

/// `\r \n \t \0 \\ \xHH` escapes to bytes.
fn decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next().expect("an escape") {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = [bytes.next().expect("hex"), bytes.next().expect("hex")];
                let hex = std::str::from_utf8(&hex).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
            }
            other => panic!("unknown escape \\{}", char::from(other)),
        }
    }
    out
}

/// What the client saw: each response's status (and body), then whether the proxy closed.
#[derive(Debug, PartialEq)]
struct Seen {
    responses: Vec<(u16, Bytes)>,
    closed: bool,
}

impl Seen {
    /// As the corpus writes it: `200 keep, 400 close`, or `none`.
    fn summary(&self) -> String {
        if self.responses.is_empty() {
            return if self.closed { "none" } else { "nothing, open" }.to_owned();
        }
        let statuses: Vec<String> = self.responses.iter().map(|(s, _)| s.to_string()).collect();
        let end = if self.closed { "close" } else { "keep" };
        statuses.join(" keep, ") + " " + end
    }
}

/// Reads responses until the proxy closes, `count` arrived (then 200 ms more, to see whether
/// it closes), or 5 s pass.
async fn read_responses(stream: &mut TcpStream, count: usize) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut responses = Vec::new();
    let mut closed = false;
    loop {
        while let Some((status, body, used)) = parse_response(&buf) {
            buf.drain(..used);
            if status >= 200 {
                responses.push((status, body));
            }
        }
        let wait = if responses.len() >= count {
            Duration::from_millis(200)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let mut chunk = [0u8; 16 * 1024];
        match timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    Seen { responses, closed }
}

/// One whole response at the start of `buf`: status, body, bytes used. Bodies come with a
/// length or chunked (the proxy's own replies, what it forwards).
fn parse_response(buf: &[u8]) -> Option<(u16, Bytes, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(buf).ok()? else {
        return None;
    };
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let status = response.code.expect("status");
    if header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        let mut at = head;
        loop {
            let line_end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
            let size = std::str::from_utf8(&buf[at..line_end]).expect("chunk size");
            let size = usize::from_str_radix(size.split(';').next().unwrap_or(size), 16)
                .expect("chunk size");
            at = line_end + 2;
            if size == 0 {
                // No trailers from the proxy's test upstreams.
                buf.get(at..at + 2)?;
                return Some((status, Bytes::from(body), at + 2));
            }
            body.extend_from_slice(buf.get(at..at + size)?);
            at += size + 2;
        }
    }
    let length = header("content-length").map_or(0, |l| l.parse::<usize>().expect("length"));
    let body = buf.get(head..head + length)?;
    Some((status, Bytes::copy_from_slice(body), head + length))
}

/// The requests an upstream received whole, as `METHOD path`, with their `Host`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, String)>>>);

impl Received {
    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A hyper HTTP/1.1 server that records every request it reads whole and answers `ok`. It
/// takes up to 1,000 headers, so what the proxy adds never makes it refuse a request.
async fn recording_upstream(ip: Ipv4Addr, received: Received) {
    let listener = TcpListener::bind((ip, UPSTREAM_PORT)).await.expect("bind");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = received.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let received = received.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    if body.collect().await.is_ok() {
                        let host = parts
                            .headers
                            .get(http::header::HOST)
                            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                            .unwrap_or_default();
                        received
                            .0
                            .lock()
                            .unwrap()
                            .push((format!("{} {}", parts.method, parts.uri.path()), host));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_headers(1000)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// Counts panics anywhere in the process (the proxy's tasks included: tokio catches those).
fn count_panics() -> Arc<AtomicUsize> {
    let panics = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&panics);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::Relaxed);
        previous(info);
    }));
    panics
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Sends one case on a fresh connection; what the client and the upstream saw.
async fn run_request(
    mesh: &Mesh,
    received: &Received,
    case: &Case,
) -> (Seen, Vec<(String, String)>) {
    let expected = case.expect.split(',').count();
    let mut stream = mesh.connect(SERVICE_C).await;
    // The proxy may answer and close before reading everything: a failed write is fine.
    let _ = stream.write_all(&case.bytes).await;
    if case.eof {
        let _ = stream.shutdown().await;
    }
    let seen = read_responses(&mut stream, expected).await;
    drop(stream);
    (seen, received.take())
}

/// The checker's conclusions on every corpus request do not depend on how its bytes are split
/// into reads: two reads split at every byte, and one byte at a time.
#[test]
fn the_head_checker_concludes_the_same_whatever_the_reads() {
    let conclusions = |pieces: &mut dyn Iterator<Item = &[u8]>, eof: bool| {
        let mut checker = HeadChecker::new();
        let mut seen = Vec::new();
        for piece in pieces {
            checker.feed(piece, &mut |c| seen.push(c));
        }
        if eof {
            checker.end(&mut |c| seen.push(c));
        }
        seen
    };
    for case in corpus("requests.txt") {
        let bytes = &case.bytes[..];
        let whole = conclusions(&mut std::iter::once(bytes), case.eof);
        assert!(!whole.is_empty() || case.bytes.is_empty(), "{}", case.name);
        let one_by_one = conclusions(&mut bytes.chunks(1), case.eof);
        assert_eq!(one_by_one, whole, "{}: byte by byte", case.name);
        // Every split point of requests up to 4 KiB; 256 of each larger one.
        let step = match bytes.len() {
            0..=4096 => 1,
            len => len / 256,
        };
        for at in (0..=bytes.len()).step_by(step) {
            let (a, b) = bytes.split_at(at);
            let split = conclusions(&mut [a, b].into_iter(), case.eof);
            assert_eq!(split, whole, "{}: split at {at}", case.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_request_is_answered_as_envoy_answers_it_and_nothing_is_smuggled() {
    let panics = count_panics();
    let cases = corpus("requests.txt");
    assert!(cases.len() >= 80, "{} requests in the corpus", cases.len());
    let received = Received::default();
    let (ip1, ip2) = (loopback(), loopback());
    recording_upstream(ip1, received.clone()).await;
    recording_upstream(ip2, received.clone()).await;
    let mut yaml = service_c_yaml(ip1, ip2);
    yaml.push_str("\n---\n");
    yaml.push_str(&example("canary/1-vs-v1.yml"));
    let mesh = Mesh::start(&yaml).await;

    let mut failures = String::new();
    let mut rss = vec![rss_kib()];
    for round in 0..3 {
        for case in &cases {
            let (seen, upstream) = run_request(&mesh, &received, case).await;
            let got = seen.summary();
            let requests: Vec<&str> = upstream.iter().map(|(r, _)| r.as_str()).collect();
            let requests = if requests.is_empty() {
                "-".to_owned()
            } else {
                requests.join("; ")
            };
            if round == 0 && (got != case.expect || requests != case.upstream) {
                let _ = writeln!(
                    failures,
                    "{}: answered `{got}` (want `{}`), upstream got `{requests}` (want `{}`)",
                    case.name, case.expect, case.upstream
                );
            }
            if let Some(host) = &case.upstream_host {
                if let Some((_, wrong)) = upstream.iter().find(|(_, h)| h != host) {
                    let _ = writeln!(failures, "{}: upstream saw Host `{wrong}`", case.name);
                }
            }
        }
        rss.push(rss_kib());
    }
    // The connections it left are gone, and the upstream got nothing late.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        received.take(),
        vec![],
        "requests reached the upstream late"
    );
    let panicked = panics.load(Ordering::Relaxed);
    eprintln!(
        "{} requests, 3 rounds: RSS {} KiB, after each round {:?} KiB; {panicked} panics",
        cases.len(),
        rss[0],
        &rss[1..]
    );
    assert!(failures.is_empty(), "corpus mismatches:\n{failures}");
    assert_eq!(panicked, 0, "the proxy panicked");
    // Memory is bounded: a round costs little (measured: under 2 MiB; on main, the first
    // round's panics took 215 MiB), and the next rounds next to nothing more (the allocator
    // keeps what the first took).
    let first = rss[1].saturating_sub(rss[0]);
    assert!(
        first < 32 * 1024,
        "RSS grew {first} KiB in one round: {rss:?}"
    );
    let more = rss[3].saturating_sub(rss[1]);
    assert!(
        more < 16 * 1024,
        "RSS grew {more} KiB over two more rounds: {rss:?}"
    );
}

/// An upstream that answers every request head it reads with `bytes` (then closes if `close`).
async fn raw_upstream(ip: Ipv4Addr, bytes: Vec<u8>, close: bool) {
    let listener = TcpListener::bind((ip, UPSTREAM_PORT)).await.expect("bind");
    let bytes = Arc::new(bytes);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let bytes = Arc::clone(&bytes);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // The proxy's requests here are GETs without a body.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                        if close {
                            return;
                        }
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_responses_get_502_and_nothing_is_passed_on() {
    let panics = count_panics();
    let cases = corpus("responses.txt");
    assert!(cases.len() >= 12, "{} responses in the corpus", cases.len());
    let mut failures = String::new();
    for case in &cases {
        let ip = loopback();
        raw_upstream(ip, case.bytes.clone(), case.close).await;
        let vip = Ipv4Addr::new(10, 96, 0, 40);
        let yaml = service(
            "service-r",
            vip,
            8080,
            "http",
            &[Backend {
                pod: "service-r-0",
                ip,
                labels: &[("app", "service-r")],
            }],
        );
        let mesh = Mesh::start(&yaml).await;
        let (status, body) = case.expect.split_once(' ').unwrap_or((&case.expect, ""));
        let status: u16 = status.parse().expect("a status");
        let mut stream = mesh.connect(std::net::SocketAddrV4::new(vip, 8080)).await;
        for attempt in 1..=2 {
            let request = b"GET / HTTP/1.1\r\nHost: service-r\r\n\r\n";
            if stream.write_all(request).await.is_err() {
                let _ = writeln!(
                    failures,
                    "{}: connection closed before try {attempt}",
                    case.name
                );
                break;
            }
            let seen = read_responses(&mut stream, 1).await;
            let got: Vec<(u16, String)> = seen
                .responses
                .iter()
                .map(|(s, b)| (*s, String::from_utf8_lossy(b).into_owned()))
                .collect();
            let matches =
                got.len() == 1 && got[0].0 == status && (body.is_empty() || got[0].1 == body);
            if !matches {
                let _ = writeln!(
                    failures,
                    "{} (request {attempt}): got {got:?}, want `{}`",
                    case.name, case.expect
                );
                break;
            }
            if seen.closed {
                let _ = writeln!(
                    failures,
                    "{}: the proxy closed the client's connection",
                    case.name
                );
                break;
            }
        }
    }
    assert!(failures.is_empty(), "corpus mismatches:\n{failures}");
    assert_eq!(panics.load(Ordering::Relaxed), 0, "the proxy panicked");
}
