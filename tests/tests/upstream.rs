//! The `upstream` test peer against itself on loopback, so the binary the HTTP proxy's
//! end-to-end tests rely on keeps working. Needs no root and no simulated node.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");

/// A running `upstream serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    /// The rest of its output (request lines with `--log`).
    stdout: BufReader<ChildStdout>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(UPSTREAM)
            .args(["serve", "--listen", "127.0.0.1:0", "--name", "v1"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn upstream serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read listening line");
        let listening: Value = serde_json::from_str(&line).expect("listening line is JSON");
        let addr = listening["listening"]
            .as_str()
            .expect("listening address")
            .to_owned();
        Server {
            child,
            addr,
            stdout,
        }
    }

    /// The next line the server prints, as JSON (blocks until there is one).
    fn next_line(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read a line");
        serde_json::from_str(&line).expect("the server prints JSON lines")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an `upstream` client and returns its JSON lines (the summary last).
fn run(args: &[&str]) -> Vec<Value> {
    let output = Command::new(UPSTREAM)
        .args(args)
        .output()
        .expect("run upstream");
    assert!(output.status.success(), "upstream {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

#[test]
fn get_keeps_one_http1_connection_and_close_opens_new_ones() {
    let server = Server::start(&[]);
    let lines = run(&["get", "--url", &server.url("/"), "--count", "3"]);
    assert_eq!(lines.len(), 4);
    for (i, line) in lines[..3].iter().enumerate() {
        assert_eq!(line["status"], 200);
        assert_eq!(line["body"], "v1");
        assert_eq!(line["version"], "HTTP/1.1");
        assert_eq!(line["headers"]["x-served-by"], "v1");
        assert_eq!(line["headers"]["x-request-count"], (i + 1).to_string());
        assert_eq!(line["headers"]["x-peer"], lines[0]["headers"]["x-peer"]);
    }
    assert_eq!(lines[3]["summary"], true);
    assert_eq!(lines[3]["sent"], 3);
    assert_eq!(lines[3]["by_body"]["v1"], 3);
    assert_eq!(lines[3]["errors"], 0);

    let lines = run(&["get", "--url", &server.url("/"), "--count", "2", "--close"]);
    assert_ne!(lines[0]["headers"]["x-peer"], lines[1]["headers"]["x-peer"]);
}

#[test]
fn get_h2_and_headers() {
    let server = Server::start(&[]);
    let lines = run(&["get", "--url", &server.url("/"), "--count", "2", "--h2"]);
    assert_eq!(lines[0]["version"], "HTTP/2.0");
    assert_eq!(lines[1]["headers"]["x-peer"], lines[0]["headers"]["x-peer"]);
    assert_eq!(lines[2]["by_status"]["200"], 2);

    let lines = run(&[
        "get",
        "--url",
        &server.url("/headers?q=1"),
        "--header",
        "x-test: a",
        "--header",
        "x-test: b",
    ]);
    let echoed: Value = serde_json::from_str(lines[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["x-test"], "a, b");
    assert_eq!(echoed[":method"], "GET");
    assert_eq!(echoed[":path"], "/headers?q=1");
    assert_eq!(echoed[":version"], "HTTP/1.1");
    assert_eq!(echoed["host"], server.addr.as_str());
    assert_eq!(echoed["x-body-len"], 0);
}

#[test]
fn grpc_crash_and_repair() {
    let server = Server::start(&[]);
    let say = server.url("/demo.Echo/Say");
    let lines = run(&["grpc", "--url", &say, "--count", "2"]);
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["grpc_status"], "0");
    assert_eq!(lines[0]["message"], "v1");
    assert_eq!(lines[2]["by_grpc_status"]["0"], 2);

    assert_eq!(
        run(&["get", "--url", &server.url("/crash")])[0]["body"],
        "crashed"
    );
    let lines = run(&["get", "--url", &server.url("/")]);
    assert_eq!(lines[0]["status"], 500);
    assert_eq!(lines[0]["body"], "Error 500 (Hostname: v1)");
    assert_eq!(run(&["grpc", "--url", &say])[0]["grpc_status"], "14");
    assert_eq!(
        run(&["get", "--url", &server.url("/health")])[0]["body"],
        "UP"
    );

    assert_eq!(
        run(&["get", "--url", &server.url("/repair")])[0]["body"],
        "repaired"
    );
    assert_eq!(run(&["get", "--url", &server.url("/")])[0]["status"], 200);
}

#[test]
fn delay_does_not_block_other_connections() {
    let server = Server::start(&[]);
    let slow = Command::new(UPSTREAM)
        .args(["get", "--url", &server.url("/delay/1000"), "--quiet"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn slow get");
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    assert_eq!(run(&["get", "--url", &server.url("/")])[0]["status"], 200);
    assert!(start.elapsed() < Duration::from_millis(700));

    let start = Instant::now();
    let lines = run(&["get", "--url", &server.url("/delay/200")]);
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(lines[0]["body"], "v1");

    let output = slow.wait_with_output().expect("slow get");
    let summary: Value = serde_json::from_slice(&output.stdout).expect("summary only");
    assert_eq!(summary["by_status"]["200"], 1);
}

#[test]
fn paced_concurrent_load_status_and_fail_status() {
    let server = Server::start(&["--fail-status", "503"]);
    let start = Instant::now();
    let lines = run(&[
        "get",
        "--url",
        &server.url("/"),
        "--count",
        "20",
        "--rate",
        "100",
        "--concurrency",
        "3",
        "--quiet",
    ]);
    // 20 requests at 100/s: the last one goes out 190 ms in.
    assert!(start.elapsed() >= Duration::from_millis(190));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["sent"], 20);
    assert_eq!(lines[0]["by_status"]["503"], 20);
    assert_eq!(lines[0]["by_body"]["Error 503 (Hostname: v1)"], 20);

    let lines = run(&["get", "--url", &server.url("/status/418")]);
    assert_eq!(lines[0]["status"], 418);
    assert_eq!(lines[0]["body"], "418");

    // Nothing listens on the server's port once it is gone: errors are lines, not a failure.
    let url = server.url("/");
    drop(server);
    let lines = run(&["get", "--url", &url, "--count", "2"]);
    assert_eq!(lines[0]["status"], 0);
    assert!(lines[0]["error"].is_string());
    assert_eq!(lines[2]["errors"], 2);
}

#[test]
fn delay_by_query_holds_only_the_first_tries_of_a_request_id() {
    let server = Server::start(&[]);
    let url = server.url("/any/path?delay_ms=300");
    let lines = run(&["get", "--url", &url]);
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["body"], "v1");
    assert!(
        lines[0]["elapsed_ms"].as_f64().unwrap() >= 300.0,
        "{}",
        lines[0]
    );

    // The first try of request "a" is held, its second answers at once, as a retry would.
    let url = server.url("/?delay_ms=300&delay_tries=1");
    let once = ["get", "--url", &url, "--header", "x-request-id: a"];
    let first = run(&once);
    assert!(
        first[0]["elapsed_ms"].as_f64().unwrap() >= 300.0,
        "{}",
        first[0]
    );
    let second = run(&once);
    assert!(
        second[0]["elapsed_ms"].as_f64().unwrap() < 250.0,
        "{}",
        second[0]
    );
    // Another request id is held again.
    let other = run(&["get", "--url", &url, "--header", "x-request-id: b"]);
    assert!(
        other[0]["elapsed_ms"].as_f64().unwrap() >= 300.0,
        "{}",
        other[0]
    );

    let missing_id = run(&["get", "--url", &url]);
    assert_eq!(missing_id[0]["status"], 400);
    assert_eq!(
        run(&["get", "--url", &server.url("/?delay_ms=x")])[0]["status"],
        400
    );
}

#[test]
fn a_slow_server_holds_every_answer_and_logs_each_request_as_it_arrives() {
    let mut server = Server::start(&["--delay-ms", "300", "--log"]);
    let lines = run(&[
        "get",
        "--url",
        &server.url("/checkout?x=1"),
        "--method",
        "POST",
        "--header",
        "host: shop-shadow",
        "--header",
        "x-request-id: r1",
    ]);
    assert_eq!(lines[0]["status"], 200);
    assert!(
        lines[0]["elapsed_ms"].as_f64().unwrap() >= 300.0,
        "{}",
        lines[0]
    );
    let logged = server.next_line();
    assert_eq!(logged["request"], 1, "{logged}");
    assert_eq!(logged["method"], "POST", "{logged}");
    assert_eq!(logged["path"], "/checkout?x=1", "{logged}");
    assert_eq!(logged["host"], "shop-shadow", "{logged}");
    assert_eq!(logged["request_id"], "r1", "{logged}");

    // HTTP/2 names the host in :authority; a request without an id logs null.
    run(&["get", "--url", &server.url("/"), "--h2"]);
    let logged = server.next_line();
    assert_eq!(logged["request"], 2, "{logged}");
    assert_eq!(logged["host"], server.addr.as_str(), "{logged}");
    assert_eq!(logged["request_id"], Value::Null, "{logged}");

    // Numbered request ids: loop and request number, on the request and on its line.
    let lines = run(&[
        "get",
        "--url",
        &server.url("/"),
        "--count",
        "3",
        "--concurrency",
        "2",
        "--request-ids",
        "t",
    ]);
    let mut ids: Vec<&str> = lines[..3]
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["t-0-0", "t-0-1", "t-1-0"]);
    let mut logged: Vec<Value> = (0..3)
        .map(|_| server.next_line()["request_id"].clone())
        .collect();
    logged.sort_by_key(|id| id.to_string());
    assert_eq!(logged, ["t-0-0", "t-0-1", "t-1-0"]);

    let output = Command::new(UPSTREAM)
        .args(["get", "--url", &server.url("/"), "--method", "NOT A METHOD"])
        .output()
        .expect("run upstream");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--method"));
}
