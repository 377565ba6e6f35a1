//! One structured JSON line per connection (`kind: "tcp"`) or HTTP request (`kind: "http"`) on
//! stdout, when enabled. Off by default; HTTP lines can be sampled.
//!
//! Data-path threads never write to stdout themselves: a line goes into a bounded queue that
//! a writer thread empties. When stdout cannot keep up (a slow pipe, a stopped terminal) and the
//! queue is full, the line is dropped and counted (`mesh_access_log_dropped_lines_total`)
//! rather than stalling requests.

use std::{
    fmt,
    io::{self, Write},
    net::{SocketAddr, SocketAddrV4},
    sync::mpsc::{self, SyncSender, TrySendError},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::{Serialize, Serializer};

/// How the access log behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLogOptions {
    pub enabled: bool,
    /// Fraction of HTTP requests logged, 0.0 to 1.0 (TCP connections are always logged).
    pub sample_ratio: f64,
    /// Log the path with its query string. Off by default: queries often carry tokens or
    /// personal data.
    pub include_query: bool,
}

impl Default for AccessLogOptions {
    fn default() -> Self {
        AccessLogOptions {
            enabled: false,
            sample_ratio: 1.0,
            include_query: false,
        }
    }
}

/// Lines waiting for the writer thread; beyond that they are dropped. At a few hundred bytes
/// a line, a few MiB at most.
pub const QUEUE_LINES: usize = 16 * 1024;

/// Decides and formats lines; hands them to the writer thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    options: AccessLogOptions,
    /// `None` when disabled (or for a log that only formats lines, in tests).
    queue: Option<SyncSender<Vec<u8>>>,
    dropped: Counter,
}

/// The writer thread. [`finish`](Self::finish) it after the last [`AccessLog`] clone is gone
/// so queued lines are written before the process exits.
#[derive(Debug)]
pub struct AccessLogWriter(Option<JoinHandle<()>>);

impl AccessLogWriter {
    /// Waits until every queued line is written, for at most `within`: the thread ends only
    /// once every clone of the log is dropped, and a clone still alive somewhere must not hold
    /// up the exit.
    pub fn finish(mut self, within: Duration) {
        let Some(thread) = self.0.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + within;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            #[expect(
                clippy::disallowed_methods,
                reason = "runs once, at exit, after the data path has stopped"
            )]
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

/// A finished L4 connection.
#[derive(Debug, Serialize)]
pub struct TcpRecord<'a> {
    pub source_pod: &'a str,
    /// The client's local port inside its pod (the accepted socket's peer port).
    pub client_port: u16,
    pub original_dst: SocketAddrV4,
    /// The endpoint connected to (a service VIP's chosen endpoint, or the original destination).
    pub upstream: Option<SocketAddr>,
    /// Bytes from the client to the upstream.
    pub sent_bytes: u64,
    /// Bytes from the upstream to the client.
    pub received_bytes: u64,
    #[serde(rename = "duration_us", serialize_with = "as_micros")]
    pub duration: Duration,
    pub error: Option<String>,
}

/// A finished HTTP request. Borrowed fields, so building one costs nothing when the line is
/// sampled out.
#[derive(Serialize)]
pub struct HttpRecord<'a> {
    pub source_pod: &'a str,
    pub source_workload: &'a str,
    /// The destination service's host, `unknown` outside the mesh.
    pub destination_service: &'a str,
    /// The `DestinationRule` subset the request went to, if any.
    pub destination_subset: Option<&'a str>,
    /// The endpoint of the last attempt; `None` when no attempt was made (no healthy upstream).
    pub endpoint: Option<SocketAddr>,
    pub method: &'a str,
    /// The request's path and query as received; the query is cut unless
    /// [`AccessLogOptions::include_query`].
    #[serde(skip)]
    pub path_and_query: &'a str,
    /// The status sent to the client.
    pub status: u16,
    /// Envoy response flags (`-`, `UH`, `UF,URX`...), rendered only when the line is written.
    #[serde(serialize_with = "as_display")]
    pub response_flags: &'a dyn fmt::Display,
    /// Upstream attempts: 1 plus retries (0 when none was made).
    pub attempts: u32,
    #[serde(rename = "duration_us", serialize_with = "as_micros")]
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub request_id: &'a str,
    /// 32 hex digits, as Jaeger shows it.
    #[serde(serialize_with = "as_trace_id")]
    pub trace_id: u128,
    /// This hop's span and its parent (the caller's span), 16 hex digits each.
    #[serde(serialize_with = "as_span_id")]
    pub span_id: u64,
    #[serde(serialize_with = "as_parent_span_id")]
    pub parent_span_id: Option<u64>,
}

#[derive(Serialize)]
struct Line<'a, T> {
    time: f64,
    kind: &'static str,
    #[serde(flatten)]
    record: &'a T,
}

/// An HTTP line: the record plus the path as it is logged.
#[derive(Serialize)]
struct HttpLine<'a> {
    path: &'a str,
    #[serde(flatten)]
    record: &'a HttpRecord<'a>,
}

fn as_micros<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn as_display<S: Serializer>(value: &&dyn fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn as_trace_id<S: Serializer>(id: &u128, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{id:032x}"))
}

fn as_span_id<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{id:016x}"))
}

fn as_parent_span_id<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => as_span_id(id, s),
        None => s.serialize_none(),
    }
}

impl AccessLog {
    /// Enabled or not, every HTTP request logged, no query strings, written to stdout.
    pub fn new(enabled: bool) -> (Self, AccessLogWriter) {
        AccessLog::stdout(AccessLogOptions {
            enabled,
            ..AccessLogOptions::default()
        })
    }

    /// Lines to stdout, through a queue of [`QUEUE_LINES`].
    pub fn stdout(options: AccessLogOptions) -> (Self, AccessLogWriter) {
        AccessLog::with_writer(options, io::stdout(), QUEUE_LINES)
    }

    /// Lines to `out`, through a queue of `capacity` lines (no thread when disabled).
    pub fn with_writer(
        options: AccessLogOptions,
        out: impl Write + Send + 'static,
        capacity: usize,
    ) -> (Self, AccessLogWriter) {
        if !options.enabled {
            return (AccessLog::formatting_only(options), AccessLogWriter(None));
        }
        let (queue, lines) = mpsc::sync_channel::<Vec<u8>>(capacity);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&lines, out))
            .expect("spawning the access-log writer thread");
        let log = AccessLog {
            options,
            queue: Some(queue),
            dropped: Counter::default(),
        };
        (log, AccessLogWriter(Some(thread)))
    }

    /// A log that formats lines ([`http_line`](Self::http_line), [`tcp_line`](Self::tcp_line))
    /// but writes none.
    pub fn formatting_only(options: AccessLogOptions) -> Self {
        AccessLog {
            options,
            queue: None,
            dropped: Counter::default(),
        }
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Serves `dropped_lines_total` (under the caller's prefix: `mesh_access_log_`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "dropped_lines",
            "Access-log lines dropped because the writer could not keep up",
            self.dropped.clone(),
        );
    }

    /// Whether anything is logged at all, so callers can skip gathering a record.
    pub fn is_enabled(&self) -> bool {
        self.options.enabled
    }

    pub fn tcp(&self, record: &TcpRecord<'_>) {
        if let Some(line) = self.tcp_line(record) {
            self.write(line);
        }
    }

    /// Logs `record` if enabled and sampled in.
    pub fn http(&self, record: &HttpRecord<'_>) {
        if let Some(line) = self.http_line(record) {
            self.write(line);
        }
    }

    /// Queues a line for the writer thread; never waits.
    fn write(&self, line: Vec<u8>) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }

    /// The line [`tcp`](Self::tcp) would write, `None` when disabled.
    pub fn tcp_line(&self, record: &TcpRecord<'_>) -> Option<Vec<u8>> {
        if !self.options.enabled {
            return None;
        }
        line("tcp", record)
    }

    /// The line [`http`](Self::http) would write, `None` when disabled or sampled out.
    pub fn http_line(&self, record: &HttpRecord<'_>) -> Option<Vec<u8>> {
        if !self.options.enabled || !sampled(self.options.sample_ratio) {
            return None;
        }
        let path = if self.options.include_query {
            record.path_and_query
        } else {
            record
                .path_and_query
                .split_once('?')
                .map_or(record.path_and_query, |(path, _)| path)
        };
        line("http", &HttpLine { path, record })
    }
}

fn sampled(ratio: f64) -> bool {
    // `f64()` is in [0, 1): a ratio of 1 always logs, 0 never does.
    ratio >= 1.0 || fastrand::f64() < ratio
}

fn line<T: Serialize>(kind: &'static str, record: &T) -> Option<Vec<u8>> {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let mut line = serde_json::to_vec(&Line { time, kind, record }).ok()?;
    line.push(b'\n');
    Some(line)
}

/// The writer thread: whole lines, flushed whenever the queue runs empty, until every sender is
/// gone.
fn write_lines(lines: &mpsc::Receiver<Vec<u8>>, out: impl Write) {
    let mut out = io::BufWriter::new(out);
    while let Ok(line) = lines.recv() {
        let _ = out.write_all(&line);
        while let Ok(line) = lines.try_recv() {
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn enabled() -> AccessLogOptions {
        AccessLogOptions {
            enabled: true,
            ..AccessLogOptions::default()
        }
    }

    fn http_record<'a>(flags: &'a dyn fmt::Display) -> HttpRecord<'a> {
        HttpRecord {
            source_pod: "client-7d9f",
            source_workload: "client",
            destination_service: "service-c.default.svc.cluster.local",
            destination_subset: Some("v1"),
            endpoint: Some("10.77.0.3:8080".parse().expect("addr")),
            method: "GET",
            path_and_query: "/items/7?token=secret",
            status: 503,
            response_flags: flags,
            attempts: 3,
            duration: Duration::from_micros(1_500),
            request_bytes: 0,
            response_bytes: 19,
            request_id: "6b1b3f6e-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
            trace_id: 0x463ac35c9f6413ad48485a3953bb6124,
            span_id: 0x00f0_67aa_0ba9_02b7,
            parent_span_id: None,
        }
    }

    fn parse(line: &[u8]) -> serde_json::Value {
        assert_eq!(line.last(), Some(&b'\n'), "a line ends with a newline");
        assert_eq!(
            line.iter().filter(|b| **b == b'\n').count(),
            1,
            "one line per record"
        );
        serde_json::from_slice(line).expect("JSON")
    }

    #[test]
    fn http_line_has_every_field() {
        let log = AccessLog::formatting_only(enabled());
        let line = log.http_line(&http_record(&"UF,URX")).expect("logged");
        let json = parse(&line);
        assert_eq!(json["kind"], "http");
        assert!(json["time"].as_f64().expect("time") > 1.6e9);
        assert_eq!(json["source_pod"], "client-7d9f");
        assert_eq!(json["source_workload"], "client");
        assert_eq!(
            json["destination_service"],
            "service-c.default.svc.cluster.local"
        );
        assert_eq!(json["destination_subset"], "v1");
        assert_eq!(json["endpoint"], "10.77.0.3:8080");
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], "/items/7", "no query by default");
        assert_eq!(json["status"], 503);
        assert_eq!(json["response_flags"], "UF,URX");
        assert_eq!(json["attempts"], 3);
        assert_eq!(json["duration_us"], 1500);
        assert_eq!(json["request_bytes"], 0);
        assert_eq!(json["response_bytes"], 19);
        assert_eq!(json["request_id"], "6b1b3f6e-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(json["trace_id"], "463ac35c9f6413ad48485a3953bb6124");
        assert!(json.get("path_and_query").is_none());
    }

    #[test]
    fn query_is_logged_only_when_asked() {
        let log = AccessLog::formatting_only(AccessLogOptions {
            enabled: true,
            include_query: true,
            ..AccessLogOptions::default()
        });
        let json = parse(&log.http_line(&http_record(&"-")).expect("logged"));
        assert_eq!(json["path"], "/items/7?token=secret");
    }

    #[test]
    fn off_by_default_and_sampled() {
        assert!(!AccessLog::formatting_only(AccessLogOptions::default()).is_enabled());
        let record = http_record(&"-");
        assert!(AccessLog::formatting_only(AccessLogOptions::default())
            .http_line(&record)
            .is_none());
        let never = AccessLog::formatting_only(AccessLogOptions {
            enabled: true,
            sample_ratio: 0.0,
            ..AccessLogOptions::default()
        });
        assert!(never.http_line(&record).is_none());
        let tenth = AccessLog::formatting_only(AccessLogOptions {
            enabled: true,
            sample_ratio: 0.1,
            ..AccessLogOptions::default()
        });
        let logged = (0..10_000)
            .filter(|_| tenth.http_line(&record).is_some())
            .count();
        assert!((800..1_200).contains(&logged), "{logged}");
    }

    #[test]
    fn tcp_line_keeps_its_shape() {
        let log = AccessLog::formatting_only(enabled());
        let record = TcpRecord {
            source_pod: "client-7d9f",
            client_port: 40_000,
            original_dst: "10.77.0.3:9000".parse().expect("addr"),
            upstream: None,
            sent_bytes: 5,
            received_bytes: 6,
            duration: Duration::from_millis(2),
            error: None,
        };
        let json = parse(&log.tcp_line(&record).expect("logged"));
        assert_eq!(json["kind"], "tcp");
        assert_eq!(json["original_dst"], "10.77.0.3:9000");
        assert_eq!(json["duration_us"], 2000);
        assert!(AccessLog::formatting_only(AccessLogOptions::default())
            .tcp_line(&record)
            .is_none());
    }

    /// A writer that says when its first write starts, then holds it until the test opens the
    /// gate.
    struct Gated {
        entered: mpsc::Sender<()>,
        gate: Option<mpsc::Receiver<()>>,
        written: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let _ = self.entered.send(());
                let _ = gate.recv();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_lines_instead_of_blocking() {
        let (open, gate) = mpsc::channel();
        let (entered, writer_stuck) = mpsc::channel();
        let written = Arc::default();
        let out = Gated {
            entered,
            gate: Some(gate),
            written: Arc::clone(&written),
        };
        let capacity = 4;
        let (log, writer) = AccessLog::with_writer(enabled(), out, capacity);
        let record = TcpRecord {
            source_pod: "client",
            client_port: 40_000,
            original_dst: "10.77.0.3:9000".parse().expect("addr"),
            upstream: None,
            sent_bytes: 0,
            received_bytes: 0,
            duration: Duration::ZERO,
            error: None,
        };
        // The writer takes a first line and gets stuck writing it (its buffer would otherwise
        // take in lines as fast as they come, and the queue would never fill).
        log.tcp(&record);
        writer_stuck
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer starts writing");
        let sent = 50;
        // Stuck writer: these return at once all the same, and only the queue's worth is kept.
        for _ in 0..sent {
            log.tcp(&record);
        }
        let dropped = log.dropped();
        assert_eq!(dropped, sent - capacity as u64);
        let mut registry = prometheus_client::registry::Registry::default();
        log.register_metrics(registry.sub_registry_with_prefix("mesh_access_log"));
        let (_, text) = crate::exposition::render(&registry, None);
        let served = format!("mesh_access_log_dropped_lines_total {dropped}");
        assert!(text.contains(&served), "{text}");
        open.send(()).expect("writer waiting");
        drop(log);
        writer.finish(Duration::from_secs(10));
        let written = written.lock().unwrap();
        let lines: Vec<&[u8]> = written.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(
            lines.len() as u64,
            1 + sent - dropped,
            "every queued line is written"
        );
        for line in lines {
            parse(line);
        }
    }
}
