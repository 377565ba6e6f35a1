//! A real browser on a simulated node: Debian's Chromium, headless, driven over WebDriver by
//! Debian's ChromeDriver (both installed on first use), so a test loads a page the agent serves
//! on the node's loopback, waits for it to draw, reads its DOM and saves a screenshot.
//!
//! Chromium runs with the flags this closed machine needs (no sandbox as root, no GPU, no
//! background networking, a fresh profile): nothing it does leaves the node's namespace.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::{http, packages, PodProcess, SimNode};

/// Debian's packages of the browser, its driver, and a font for the screenshots.
pub const PACKAGES: [&str; 3] = ["chromium", "chromium-driver", "fonts-dejavu-core"];

/// Where ChromeDriver listens, inside the node's network namespace.
const DRIVER: &str = "127.0.0.1:9515";
const READY_WITHIN: Duration = Duration::from_secs(30);
/// The window's size, which is the screenshots' size.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 480;

pub struct Browser<'n> {
    node: &'n SimNode,
    session: String,
    // Field order is drop order: the driver (and its Chromium) before the profile it uses.
    _driver: PodProcess,
    _profile: tempfile::TempDir,
}

impl<'n> Browser<'n> {
    /// Starts ChromeDriver and a headless Chromium on `node`, and opens `url` there.
    pub fn open(node: &'n SimNode, url: &str) -> Result<Browser<'n>> {
        packages::ensure(&PACKAGES, |line| eprintln!("browser: {line}"))?;
        let profile = tempfile::Builder::new()
            .prefix("mesh-chromium-")
            .tempdir()?;
        let mut command = Command::new("chromedriver");
        command.arg(format!(
            "--port={}",
            DRIVER.rsplit(':').next().unwrap_or("9515")
        ));
        let driver = node.spawn_on_node(command)?;
        let started = Instant::now();
        loop {
            let status = Self::call(node, "GET", "/status", None);
            if status.is_ok_and(|answer| answer["value"]["ready"] == true) {
                break;
            }
            if started.elapsed() > READY_WITHIN {
                bail!("ChromeDriver was not ready within {READY_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={WIDTH},{HEIGHT}"),
                ],
            },
        }}});
        let answer = Self::call(node, "POST", "/session", Some(capabilities))
            .context("starting Chromium")?;
        let session = answer["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no session in {answer}"))?
            .to_owned();
        let browser = Browser {
            node,
            session,
            _driver: driver,
            _profile: profile,
        };
        browser.command("POST", "url", Some(json!({ "url": url })))?;
        Ok(browser)
    }

    /// What `script` (a function body) returns in the page.
    pub fn eval(&self, script: &str) -> Result<Value> {
        let answer = self.command(
            "POST",
            "execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )?;
        Ok(answer["value"].clone())
    }

    /// Evaluates `script` until `done` says its value will do, and returns that value.
    pub fn wait_for(
        &self,
        script: &str,
        done: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let started = Instant::now();
        loop {
            let value = self.eval(script)?;
            if done(&value) {
                return Ok(value);
            }
            if started.elapsed() > timeout {
                bail!("the page did not get there within {timeout:?}; last: {value}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves what the window shows as a PNG at `path`.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let answer = self.command("GET", "screenshot", None)?;
        let encoded = answer["value"]
            .as_str()
            .with_context(|| format!("no screenshot in {answer}"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(encoded)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    fn command(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}/{what}", self.session);
        Self::call(self.node, method, &path, body)
    }

    /// One WebDriver call; an answer with an `error` fails it.
    fn call(node: &SimNode, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let address: SocketAddr = DRIVER.parse()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let headers = [("content-type", "application/json")];
        let (status, text) = node
            .run_on_node(|| http::request(address, method, path, &headers, &body))?
            .with_context(|| format!("WebDriver {method} {path}"))?;
        let answer: Value = serde_json::from_str(&text)
            .with_context(|| format!("WebDriver {method} {path} answered {status}: {text}"))?;
        if status != 200 || answer["value"].get("error").is_some() {
            bail!("WebDriver {method} {path} answered {status}: {text}");
        }
        Ok(answer)
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = Self::call(
            self.node,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}
