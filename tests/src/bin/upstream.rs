//! `upstream`: a real HTTP peer (hyper) for the HTTP proxy's end-to-end tests.
//!
//! Every subcommand prints JSON lines on stdout so tests can parse them.
//!
//! ```text
//! upstream serve --listen ADDR --name NAME [--fail-status CODE] [--delay-ms MS] [--log]
//! upstream get  --url URL [--count N] [--h2] [--close] [--header 'name: value']...
//!               [--method METHOD] [--request-ids PREFIX] [--rate RPS] [--concurrency C]
//!               [--quiet] [--timeout-secs T] [--until-sigint]
//! upstream grpc --url URL [--count N] [same pacing flags as get]
//! ```
//!
//! The server speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port; see `route` for
//! its paths. On any path, the query parameter `delay_ms=N` holds the answer N ms, and with
//! `delay_tries=K` only the first K requests carrying the same `x-request-id` are held (so a
//! proxy's retry of a held try answers at once); `--delay-ms` holds every answer (a slow
//! replica). `--log` prints one line per request as it arrives (method, path, host, request
//! id, `traceparent`, `x-forwarded-client-cert`), so a test can count what reached this server,
//! see how it was addressed and whether it came through the mesh (which writes `traceparent` on
//! every request).
//! The clients print one line per response (unless `--quiet`), with its latency, and then a
//! summary; with `--until-sigint` they stop sending at SIGINT (each loop after the request it
//! has in flight) and print the summary then. With `--request-ids PREFIX` every request
//! carries its own `x-request-id`
//! (`PREFIX-<loop>-<n>`), also printed on its line, so a test can follow each request through a
//! proxy's access log and to the server.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// Flags that take no value; every other `--flag` takes one.
const SWITCHES: &[&str] = &["h2", "close", "quiet", "log", "until-sigint"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("usage: upstream serve|get|grpc [--option value]...");
        return ExitCode::from(2);
    };
    // One thread is plenty for test traffic and keeps the pod's process small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("upstream: tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = Options::parse(rest).and_then(|options| {
        runtime.block_on(async {
            match command.as_str() {
                "serve" => serve(&options).await,
                "get" => client(&options, Call::Get).await,
                "grpc" => client(&options, Call::Grpc).await,
                other => bail!("unknown subcommand {other:?}"),
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("upstream {command}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` pairs (repeatable) and bare `--switch`es.
struct Options(HashMap<String, Vec<String>>);

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("expected --option, got {arg:?}");
            };
            let value = if SWITCHES.contains(&name) {
                String::new()
            } else {
                args.next()
                    .with_context(|| format!("--{name} needs a value"))?
                    .clone()
            };
            map.entry(name.to_owned()).or_default().push(value);
        }
        Ok(Self(map))
    }

    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.all(name).last().map(String::as_str)
    }

    fn required(&self, name: &str) -> Result<&str> {
        self.get(name)
            .with_context(|| format!("--{name} is required"))
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| anyhow!("--{name}: not a number: {text:?}")),
        }
    }
}

/// Prints one JSON line and flushes, so a test reading a pipe sees it at once.
fn emit(line: &Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

// ---------------------------------------------------------------------------------------------
// serve

type Body = BoxBody<Bytes, Infallible>;

struct Server {
    name: String,
    name_header: HeaderValue,
    /// 0 when healthy; otherwise the status `/` answers with (500 after `/crash`).
    failing: AtomicU16,
    requests: AtomicU64,
    /// Held before every answer (`--delay-ms`).
    delay: Duration,
    /// Print each request as it arrives (`--log`).
    log: bool,
    /// Requests seen per `x-request-id`, kept only for requests that ask for `delay_tries`.
    tries: Mutex<HashMap<String, u32>>,
}

async fn serve(options: &Options) -> Result<()> {
    let name = options.required("name")?.to_owned();
    let name_header =
        HeaderValue::from_str(&name).context("--name must be a valid header value")?;
    let failing = match options.get("fail-status") {
        None => 0,
        Some(code) => StatusCode::from_bytes(code.as_bytes())
            .with_context(|| format!("--fail-status {code:?}"))?
            .as_u16(),
    };
    let server = Arc::new(Server {
        name,
        name_header,
        failing: AtomicU16::new(failing),
        requests: AtomicU64::new(0),
        delay: Duration::from_millis(options.number("delay-ms", 0)?),
        log: options.has("log"),
        tries: Mutex::default(),
    });
    let listen = options.required("listen")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    emit(&json!({ "listening": listener.local_addr()?.to_string() }));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: back off rather than spin.
                eprintln!("upstream serve: accept: {error}");
                sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(server.clone(), peer, request));
            // `auto` sniffs the h2 preface, so HTTP/1.1 and h2c share the port.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    server: Arc<Server>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let count = server.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    let (parts, body) = request.into_parts();
    if server.log {
        emit(&request_line(count, &parts));
    }
    // Read the whole request body before answering, whatever its size, so a proxy never sees
    // an early response to a half-sent request.
    let drained = drain(body).await;
    let delay = match held(&server, &parts) {
        Ok(delay) => delay,
        Err(message) => return Ok(text(StatusCode::BAD_REQUEST, message)),
    };
    // An async sleep: other connections and streams go on meanwhile.
    sleep(delay).await;
    let mut response = match drained {
        Err(error) => text(StatusCode::BAD_REQUEST, format!("request body: {error}")),
        Ok(_) if grpc => grpc_reply(&server),
        Ok(body_len) => route(&server, &parts, body_len).await,
    };
    let headers = response.headers_mut();
    headers.insert("x-served-by", server.name_header.clone());
    // As most servers do; the mesh's response header rules can then be seen to remove it.
    headers.insert("server", HeaderValue::from_static("upstream"));
    headers.insert("x-peer", header_value(&peer.to_string()));
    headers.insert("x-request-count", header_value(&count.to_string()));
    Ok(response)
}

async fn route(server: &Server, parts: &Parts, body_len: usize) -> Response<Body> {
    let path = parts.uri.path();
    match path {
        "/crash" => {
            server.failing.store(500, Ordering::Relaxed);
            return text(StatusCode::OK, "crashed");
        }
        "/repair" => {
            server.failing.store(0, Ordering::Relaxed);
            return text(StatusCode::OK, "repaired");
        }
        "/health" => return text(StatusCode::OK, "UP"),
        _ => {}
    }
    // Any path ending in `/headers`, so a request whose path the mesh rewrote still shows
    // what arrived.
    if path.ends_with("/headers") {
        return text(StatusCode::OK, headers_json(parts, body_len).to_string());
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match StatusCode::from_bytes(code.as_bytes()) {
            Ok(status) => text(status, code.to_owned()),
            Err(_) => text(StatusCode::BAD_REQUEST, format!("bad status {code:?}")),
        };
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return text(StatusCode::BAD_REQUEST, format!("bad delay {ms:?}"));
        };
        // An async sleep: other connections and streams go on meanwhile.
        sleep(Duration::from_millis(ms)).await;
        return text(StatusCode::OK, server.name.clone());
    }
    match server.failing.load(Ordering::Relaxed) {
        0 => text(StatusCode::OK, server.name.clone()),
        code => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            text(status, format!("Error {code} (Hostname: {})", server.name))
        }
    }
}

/// What `--log` prints for a request: enough to count requests and see how they were addressed.
fn request_line(count: u64, parts: &Parts) -> Value {
    let header = |name: HeaderName| {
        parts
            .headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    // HTTP/2 carries the host in `:authority` rather than a `host` header.
    let host = header(HOST).or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()));
    json!({
        "request": count,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "host": host,
        "request_id": header(HeaderName::from_static("x-request-id")),
        // The mesh writes it on every request it forwards: a request without it came direct.
        "traceparent": header(HeaderName::from_static("traceparent")),
        // Set by the destination's agent when it judged the request: who the tunnel proved.
        "xfcc": header(HeaderName::from_static("x-forwarded-client-cert")),
    })
}

/// How long to hold this request: `--delay-ms` plus the query's `delay_ms`, the latter only for
/// the first `delay_tries` requests with this `x-request-id` when that is given.
fn held(server: &Server, parts: &Parts) -> Result<Duration, String> {
    let query = parts.uri.query().unwrap_or("");
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{name}: not a number: {value:?}"))
            })
            .transpose()
    };
    let mut delay = server.delay;
    let Some(ms) = param("delay_ms")? else {
        return Ok(delay);
    };
    let hold = match param("delay_tries")? {
        None => true,
        Some(tries) => {
            let id = parts
                .headers
                .get("x-request-id")
                .ok_or("delay_tries needs an x-request-id header")?;
            let id = String::from_utf8_lossy(id.as_bytes()).into_owned();
            let mut seen = server.tries.lock().unwrap_or_else(|e| e.into_inner());
            let seen = seen.entry(id).or_default();
            *seen += 1;
            u64::from(*seen) <= tries
        }
    };
    if hold {
        delay += Duration::from_millis(ms);
    }
    Ok(delay)
}

/// The request's headers as a JSON object, plus pseudo-headers and the body length.
fn headers_json(parts: &Parts, body_len: usize) -> Value {
    let mut object = joined_headers(&parts.headers);
    object.insert(":method".into(), parts.method.as_str().into());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    object.insert(":path".into(), path.into());
    object.insert(":version".into(), format!("{:?}", parts.version).into());
    if let Some(authority) = parts.uri.authority() {
        // HTTP/2 carries the host here rather than in a `host` header.
        object.insert(":authority".into(), authority.as_str().into());
    }
    object.insert("x-body-len".into(), body_len.into());
    Value::Object(object)
}

/// A gRPC unary reply: one message with the server's name, then `grpc-status` in trailers.
fn grpc_reply(server: &Server) -> Response<Body> {
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/grpc");
    let built = if server.failing.load(Ordering::Relaxed) != 0 {
        // Trailers-only: the status rides in the headers and the body is empty.
        builder
            .header("grpc-status", "14")
            .header("grpc-message", "crashed")
            .body(empty())
    } else {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        let body = Full::new(grpc_frame(server.name.as_bytes()))
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed();
        builder.body(body)
    };
    built.unwrap_or_else(|error| text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))
}

/// Reads a body to its end, keeping only its length.
async fn drain(mut body: Incoming) -> hyper::Result<usize> {
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len();
        }
    }
    Ok(len)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

/// Lower-case name → value, repeated names joined with `, `, values as lossy UTF-8.
fn joined_headers(headers: &HeaderMap) -> Map<String, Value> {
    let mut object = Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        object.insert(name.as_str().to_owned(), values.join(", ").into());
    }
    object
}

// ---------------------------------------------------------------------------------------------
// get / grpc

#[derive(Clone, Copy, PartialEq)]
enum Call {
    Get,
    Grpc,
}

struct Plan {
    call: Call,
    /// The URL as given: its authority becomes `Host` / `:authority`.
    uri: Uri,
    addr: SocketAddr,
    h2: bool,
    close: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `get`'s method (`--method`, GET by default); gRPC calls are always POST.
    method: Method,
    /// Gives each request the `x-request-id` `PREFIX-<loop>-<n>` (`--request-ids`).
    request_ids: Option<String>,
    quiet: bool,
    timeout: Duration,
    /// Seconds between two requests of the whole run (all loops together), when paced.
    interval: Option<f64>,
    concurrency: u64,
    /// Set at SIGINT with `--until-sigint`: no request is sent after it.
    stopped: Arc<AtomicBool>,
}

async fn client(options: &Options, call: Call) -> Result<()> {
    let url = options.required("url")?;
    let uri: Uri = url.parse().with_context(|| format!("--url {url:?}"))?;
    let host = uri.host().context("--url needs a host")?;
    let port = uri.port_u16().unwrap_or(80);
    // std's resolver reads /etc/hosts, which is how pods name each other.
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolve {host}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("{host} has no address"))?;
    let mut headers = Vec::new();
    for header in options.all("header") {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--header {header:?}: expected 'name: value'"))?;
        headers.push((
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_str(value.trim())?,
        ));
    }
    let rate: f64 = options.number("rate", 0.0)?;
    let method = options.get("method").unwrap_or("GET");
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| anyhow!("--method {method:?}: not an HTTP method"))?;
    let plan = Arc::new(Plan {
        call,
        uri,
        addr,
        // gRPC needs trailers, so it is HTTP/2 whatever the flags say.
        h2: options.has("h2") || call == Call::Grpc,
        close: options.has("close"),
        headers,
        method,
        request_ids: options.get("request-ids").map(str::to_owned),
        quiet: options.has("quiet"),
        timeout: Duration::from_secs_f64(options.number("timeout-secs", 10.0)?),
        interval: (rate > 0.0).then(|| 1.0 / rate),
        concurrency: options.number("concurrency", 1u64)?.max(1),
        stopped: Arc::default(),
    });
    if options.has("until-sigint") {
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let stopped = Arc::clone(&plan.stopped);
        tokio::spawn(async move {
            interrupt.recv().await;
            stopped.store(true, Ordering::SeqCst);
        });
    }
    let count: u64 = options.number("count", 1)?;
    let start = Instant::now();
    let mut loops = Vec::new();
    for index in 0..plan.concurrency {
        // Split the count as evenly as possible over the loops.
        let share = count / plan.concurrency + u64::from(index < count % plan.concurrency);
        loops.push(tokio::spawn(run_loop(plan.clone(), index, share, start)));
    }
    let mut tally = Tally::default();
    for handle in loops {
        tally.merge(handle.await?);
    }
    let mut summary = json!({
        "summary": true,
        "sent": tally.sent,
        "by_status": tally.by_status,
        "by_body": tally.by_body,
        "errors": tally.errors,
    });
    if call == Call::Grpc {
        summary["by_grpc_status"] = json!(tally.by_grpc_status);
    }
    emit(&summary);
    Ok(())
}

#[derive(Default)]
struct Tally {
    sent: u64,
    by_status: BTreeMap<String, u64>,
    by_body: BTreeMap<String, u64>,
    by_grpc_status: BTreeMap<String, u64>,
    errors: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.errors += other.errors;
        for (mine, theirs) in [
            (&mut self.by_status, other.by_status),
            (&mut self.by_body, other.by_body),
            (&mut self.by_grpc_status, other.by_grpc_status),
        ] {
            for (key, n) in theirs {
                *mine.entry(key).or_default() += n;
            }
        }
    }
}

/// One connection's worth of sequential requests; reconnects after a transport error.
async fn run_loop(plan: Arc<Plan>, index: u64, count: u64, start: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut connection: Option<Sender> = None;
    for i in 0..count {
        if let Some(interval) = plan.interval {
            // Request i of loop k goes at slot i*C + k of the whole run: a steady total rate
            // that a slow response delays but does not lower.
            let slot = (i * plan.concurrency + index) as f64;
            sleep_until(start + Duration::from_secs_f64(slot * interval)).await;
        }
        if plan.stopped.load(Ordering::SeqCst) {
            break;
        }
        let request_id = plan
            .request_ids
            .as_ref()
            .map(|prefix| format!("{prefix}-{index}-{i}"));
        let sent = Instant::now();
        let outcome = timeout(
            plan.timeout,
            exchange(&plan, request_id.as_deref(), &mut connection),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow!("timed out after {:?}", plan.timeout)));
        let elapsed = sent.elapsed();
        tally.sent += 1;
        let mut line = match outcome {
            Ok(reply) => reply.record(&plan, &mut tally),
            Err(error) => {
                // Drop the connection: the next request starts on a fresh one.
                connection = None;
                tally.errors += 1;
                match plan.call {
                    Call::Get => json!({"status": 0, "body": "", "headers": {}, "version": null,
                                        "error": format!("{error:#}")}),
                    Call::Grpc => json!({"status": 0, "grpc_status": null, "message": "",
                                         "error": format!("{error:#}")}),
                }
            }
        };
        if !plan.quiet {
            // From sending the request (connecting first if needed) to the end of the response.
            line["elapsed_ms"] = json!(elapsed.as_secs_f64() * 1000.0);
            if let Some(id) = request_id {
                line["request_id"] = json!(id);
            }
            emit(&line);
        }
    }
    tally
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(plan: &Plan) -> Result<Self> {
        let stream = TcpStream::connect(plan.addr)
            .await
            .with_context(|| format!("connect {}", plan.addr))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        // The connection future drives the socket; it ends when the server or we close.
        if plan.h2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Ok(Self::H2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(connection);
            Ok(Self::H1(sender))
        }
    }

    /// Whether the connection can take another request (false once the peer closed it).
    async fn ready(&mut self) -> bool {
        match self {
            Self::H1(sender) => sender.ready().await.is_ok(),
            Self::H2(sender) => sender.ready().await.is_ok(),
        }
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::H1(sender) => sender.send_request(request).await,
            Self::H2(sender) => sender.send_request(request).await,
        }
    }
}

struct Reply {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

/// One request/response on the loop's connection, (re)connecting first when needed.
async fn exchange(
    plan: &Plan,
    request_id: Option<&str>,
    connection: &mut Option<Sender>,
) -> Result<Reply> {
    let mut sender = match connection.take() {
        Some(mut sender) => {
            // A keep-alive connection the server closed in between is not an error: reconnect.
            if sender.ready().await {
                sender
            } else {
                Sender::connect(plan).await?
            }
        }
        None => Sender::connect(plan).await?,
    };
    let response = sender.send(request(plan, request_id)?).await?;
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.context("response body")?;
    if !plan.close {
        *connection = Some(sender);
    }
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    })
}

fn request(plan: &Plan, request_id: Option<&str>) -> Result<Request<Full<Bytes>>> {
    let mut builder = Request::builder();
    if plan.h2 {
        // HTTP/2 takes scheme and authority from the absolute URI (`:scheme`, `:authority`).
        builder = builder.uri(plan.uri.clone()).version(Version::HTTP_2);
    } else {
        let path = plan.uri.path_and_query().map_or("/", |p| p.as_str());
        builder = builder.uri(path);
        if let Some(authority) = plan.uri.authority() {
            builder = builder.header(HOST, authority.as_str());
        }
        if plan.close {
            builder = builder.header(CONNECTION, "close");
        }
    }
    let mut request = match plan.call {
        Call::Get => builder
            .method(plan.method.clone())
            .body(Full::new(Bytes::new()))?,
        Call::Grpc => builder
            .method(Method::POST)
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(b"ping")))?,
    };
    let headers = request.headers_mut();
    for (name, value) in &plan.headers {
        // `--header host: x` replaces the URL's host; other names add to what is there.
        if name == HOST {
            headers.insert(name.clone(), value.clone());
        } else {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(id) = request_id {
        headers.insert("x-request-id", HeaderValue::from_str(id)?);
    }
    Ok(request)
}

impl Reply {
    /// Counts the reply and returns its JSON line.
    fn record(self, plan: &Plan, tally: &mut Tally) -> Value {
        let status = self.status.as_u16();
        *tally.by_status.entry(status.to_string()).or_default() += 1;
        match plan.call {
            Call::Get => {
                let body = String::from_utf8_lossy(&self.body).into_owned();
                *tally.by_body.entry(body.clone()).or_default() += 1;
                json!({
                    "status": status,
                    "body": body,
                    "headers": joined_headers(&self.headers),
                    "version": format!("{:?}", self.version),
                    "error": null,
                })
            }
            Call::Grpc => {
                // Trailers normally; the headers for a trailers-only reply.
                let grpc_status = self
                    .trailers
                    .as_ref()
                    .and_then(|trailers| trailers.get("grpc-status"))
                    .or_else(|| self.headers.get("grpc-status"))
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
                let message = grpc_payload(&self.body);
                let key = grpc_status.clone().unwrap_or_else(|| "missing".into());
                *tally.by_grpc_status.entry(key).or_default() += 1;
                *tally.by_body.entry(message.clone()).or_default() += 1;
                json!({
                    "status": status,
                    "grpc_status": grpc_status,
                    "message": message,
                    "error": null,
                })
            }
        }
    }
}

/// The first message of a gRPC body as lossy UTF-8 ("" when there is none).
fn grpc_payload(body: &[u8]) -> String {
    let Some((header, rest)) = body.split_first_chunk::<5>() else {
        return String::new();
    };
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    String::from_utf8_lossy(&rest[..len.min(rest.len())]).into_owned()
}
