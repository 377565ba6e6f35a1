//! Every data-path accept loop (the pods' and the ingress's through [`Acceptor`], the tunnel's
//! and the inbound capture's through `Drain::accept_bounded`) pauses on an accept error (a
//! full file table, `EMFILE`/`ENFILE`, above all) instead of spinning on it ([`backoff_after`]),
//! logged at most once a second (all loops together) with how many were not.
//! [`raise_fd_limit`] lifts the agent's own file limit as far as it may at start, so the table
//! fills late. [`no_delay`] readies a listener's connections for the proxy's writes.

use std::{
    fmt::Display,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use socket2::SockRef;
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tracing::{info, warn};

use crate::telemetry::Telemetry;

/// The first pause after an accept error, doubled on each error in a row up to
/// [`MAX_ACCEPT_BACKOFF`] (Go's `http.Server` backs off the same way).
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// At most one accept-error log line per this long, all accept loops together (a full file
/// table fails every pod's listener at once).
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(1);

static ACCEPT_LOG: Mutex<LogLimit> = Mutex::new(LogLimit::new(ACCEPT_LOG_INTERVAL));

/// A listener whose errors pause the loop rather than spin it.
pub struct Acceptor {
    listener: TcpListener,
    /// Who accepts (a pod's name, `ingress`), for the log.
    name: String,
    telemetry: Arc<Telemetry>,
    backoff: Duration,
}

impl Acceptor {
    pub fn new(listener: TcpListener, name: impl Display, telemetry: Arc<Telemetry>) -> Self {
        no_delay(&listener);
        Acceptor {
            listener,
            name: name.to_string(),
            telemetry,
            backoff: Duration::ZERO,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection; errors meanwhile are counted
    /// (`mesh_proxy_limit_hits_total{limit="accept_error"}`), logged at most once a second,
    /// and paused on.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = Duration::ZERO;
                    return accepted;
                }
                Err(error) => {
                    self.telemetry.metrics.limit_hit("accept_error");
                    if let Some(pause) = backoff_after(&error, &self.name, &mut self.backoff) {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
    }
}

/// Turns Nagle's algorithm off for every connection `listener` accepts: they inherit it (Linux
/// copies a listener's TCP options to the sockets it accepts), so no connection needs a
/// setsockopt of its own. Many small writes go each way (responses, TLS records of HTTP/2
/// frames), and Nagle's algorithm would hold one behind the peer's delayed ACK.
pub fn no_delay(listener: &TcpListener) {
    if let Err(error) = SockRef::from(listener).set_tcp_nodelay(true) {
        warn!(%error, "could not set TCP_NODELAY on a listener");
    }
}

/// How long an accept loop pauses after `error` (`None` when the client merely gave up before
/// it was accepted), `backoff` being the loop's last pause; logged at most once a second over
/// all loops.
pub fn backoff_after(
    error: &io::Error,
    listener: &str,
    backoff: &mut Duration,
) -> Option<Duration> {
    // The client gave up before we took it: nothing is wrong with us.
    if error.kind() == io::ErrorKind::ConnectionAborted {
        return None;
    }
    *backoff = next_backoff(*backoff);
    let allowed = ACCEPT_LOG
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .allow(Instant::now());
    if let Some(suppressed) = allowed {
        warn!(
            listener,
            %error,
            suppressed,
            backoff_ms = backoff.as_millis() as u64,
            "accept failed; pausing before the next accept"
        );
    }
    Some(*backoff)
}

fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(MIN_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF)
}

/// Lets one event through per `interval`; says how many it held back since the last.
struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    const fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back so far)` if this event may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now < last + self.interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every proxied connection costs up to
/// two descriptors, and the usual soft default (1,024) is exhausted by a few hundred
/// clients. Logs what it got; a failure leaves the limit as it was.
pub fn raise_fd_limit() {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        info!(limit = ?limit.current, "open-file limit already at its hard limit");
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => info!(
            from = ?limit.current,
            to = ?limit.maximum,
            "open-file limit raised to its hard limit"
        ),
        Err(error) => warn!(%error, limit = ?limit.current, "could not raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..10 {
            backoff = next_backoff(backoff);
            seen.push(backoff.as_millis());
        }
        assert_eq!(seen, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn logs_at_most_once_per_interval_and_counts_the_rest() {
        let mut log = LogLimit::new(Duration::from_secs(1));
        let start = Instant::now();
        let mut lines = Vec::new();
        // An error every millisecond for 3.5 s.
        for ms in 0..3500u64 {
            if let Some(suppressed) = log.allow(start + Duration::from_millis(ms)) {
                lines.push((ms, suppressed));
            }
        }
        assert_eq!(lines, [(0, 0), (1000, 999), (2000, 999), (3000, 999)]);
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off_without_a_setsockopt_each() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut acceptor = Acceptor::new(listener, "pod", Arc::new(Telemetry::for_tests()));
        let address = acceptor.local_addr().unwrap();
        for _ in 0..2 {
            let _client = TcpStream::connect(address).await.unwrap();
            let (accepted, _) = acceptor.accept().await;
            assert!(accepted.nodelay().unwrap());
        }
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(
            !accepted.nodelay().unwrap(),
            "inherited from the listener, not a default"
        );
    }

    #[test]
    fn the_soft_file_limit_reaches_the_hard_one() {
        raise_fd_limit();
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(limit.current, limit.maximum);
    }
}
