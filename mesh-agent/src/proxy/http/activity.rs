//! An HTTP connection's clocks: requests in flight and when it last had none, for its header
//! and idle timeouts (`Limits::http_header_timeout`, `Limits::http_idle_timeout`); and, for
//! the downstream HTTP/1 connection that sleeps while idle, whether hyper holds anything of a
//! request. Served downstream (`downstream`) and at the destination (`inbound::http`).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::proxy::deadline;

/// How long an HTTP/2 connection closed for idleness has to take its GOAWAY before it is
/// dropped anyway (a client that does not read is not waited for).
pub(crate) const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the connection's timeouts watch: requests in flight and when it last had none; and
/// whether hyper holds anything of a request, so that an idle HTTP/1 connection can sleep.
pub(crate) struct Activity {
    pub(super) start: Instant,
    pub(super) in_flight: AtomicUsize,
    /// When the connection last became idle, in nanoseconds from `start`.
    pub(super) idle_since: AtomicU64,
    /// A request head or a whole HTTP/2 preface has arrived: the idle timeout applies from
    /// here on, not the header timeout.
    pub(super) started: AtomicBool,
    /// Everything hyper has read is whole requests (the head checker follows the framing).
    pub(super) between_requests: AtomicBool,
    /// Everything hyper has written has been flushed to the socket.
    pub(super) flushed: AtomicBool,
    /// Draining an HTTP/1 connection, which has no GOAWAY: its responses say
    /// `Connection: close`.
    pub(super) closing: AtomicBool,
}

/// Which of the connection's clocks ran out.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// A timeout, by its name (a `mesh_proxy_limit_hits_total` label).
    Expired(&'static str),
    /// Without a request for the time asked.
    Quiet,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            started: AtomicBool::new(false),
            between_requests: AtomicBool::new(false),
            flushed: AtomicBool::new(true),
            closing: AtomicBool::new(false),
        }
    }

    pub(super) fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn preface_read(&self) {
        self.idle_since.store(self.now(), Ordering::SeqCst);
        self.started.store(true, Ordering::SeqCst);
    }

    /// No request in flight, and hyper holds no byte of one, read or to write.
    pub(super) fn is_quiet(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.between_requests.load(Ordering::SeqCst)
            && self.flushed.load(Ordering::SeqCst)
    }

    /// Resolves with the timeout's name once the connection has had no request in flight for
    /// `header` (before its first) or `idle`.
    pub(crate) async fn expired(&self, header: Duration, idle: Duration) -> &'static str {
        loop {
            if let Due::Expired(name) = self.due(header, idle, None).await {
                return name;
            }
        }
    }

    /// As [`Activity::expired`], or `Due::Quiet` once the connection has had no request in
    /// flight for `quiet`'s time and its instant has come, whichever is first.
    ///
    /// `quiet` is given for an HTTP/1 connection hyper serves; there a head hyper has begun
    /// to read and not finished (nothing in flight, not between requests) has `header` from
    /// the last request's end, as a first head has from the accept.
    pub(super) async fn due(
        &self,
        header: Duration,
        idle: Duration,
        quiet: Option<(Duration, Instant)>,
    ) -> Due {
        loop {
            let head_cut_short = quiet.is_some() && !self.between_requests.load(Ordering::SeqCst);
            let (timeout, name) = if self.started.load(Ordering::SeqCst) && !head_cut_short {
                (idle, "http_idle_timeout")
            } else {
                (header, "http_header_timeout")
            };
            let since = self.start + Duration::from_nanos(self.idle_since.load(Ordering::SeqCst));
            let expires = since + timeout;
            let quiet_at = quiet.map(|(after, not_before)| (since + after).max(not_before));
            let busy = self.in_flight.load(Ordering::SeqCst) > 0;
            let now = Instant::now();
            if !busy && expires <= now {
                return Due::Expired(name);
            }
            if !busy && quiet_at.is_some_and(|at| at <= now) {
                return Due::Quiet;
            }
            // While busy, look again a while later: the request may have ended by then.
            let next = match (busy, quiet) {
                (true, Some((after, _))) => now + after.min(timeout),
                (true, None) => now + timeout,
                (false, _) => quiet_at.map_or(expires, |at| at.min(expires)),
            };
            deadline::until(next).await;
        }
    }
}

/// A request in flight, from its head until its response has been written or dropped.
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(crate) fn new(activity: Arc<Activity>) -> Self {
        activity.started.store(true, Ordering::SeqCst);
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity)
    }

    /// The connection it is in flight on.
    pub(crate) fn activity(&self) -> &Activity {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    async fn expiry(activity: &Activity) -> (&'static str, Duration) {
        let start = Instant::now();
        let name = activity.expired(HEADER, IDLE).await;
        (name, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_expires_at_the_header_timeout() {
        let activity = Activity::new();
        assert_eq!(expiry(&activity).await, ("http_header_timeout", HEADER));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_preface_the_idle_timeout_runs_from_it() {
        let activity = Arc::new(Activity::new());
        tokio::time::sleep(Duration::from_secs(3)).await;
        activity.preface_read();
        let (name, after) = expiry(&activity).await;
        assert_eq!((name, after), ("http_idle_timeout", IDLE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_connection_and_its_end_restarts_the_clock() {
        let activity = Arc::new(Activity::new());
        let request = InFlight::new(Arc::clone(&activity));
        let ends = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move {
                // Longer than both timeouts.
                tokio::time::sleep(Duration::from_secs(100)).await;
                drop(request);
                activity.now()
            })
        };
        let start = Instant::now();
        let name = activity.expired(HEADER, IDLE).await;
        let ended = Duration::from_nanos(ends.await.unwrap());
        assert_eq!(name, "http_idle_timeout");
        assert_eq!(ended, Duration::from_secs(100));
        assert_eq!(start.elapsed(), ended + IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_quiet_a_while_after_its_last_request_not_during_one() {
        let activity = Arc::new(Activity::new());
        // hyper read the request whole.
        activity.between_requests.store(true, Ordering::SeqCst);
        let quiet = Duration::from_secs(1);
        let request = InFlight::new(Arc::clone(&activity));
        let ends = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(request);
        });
        let start = Instant::now();
        let due = activity.due(HEADER, IDLE, Some((quiet, start))).await;
        ends.await.unwrap();
        assert_eq!((due, start.elapsed()), (Due::Quiet, Duration::from_secs(6)));
        // Not before the instant given (a look that found hyper busy).
        let later = Instant::now() + Duration::from_secs(3);
        let due = activity.due(HEADER, IDLE, Some((quiet, later))).await;
        assert_eq!((due, Instant::now()), (Due::Quiet, later));
        // The idle timeout still comes first when it is shorter.
        let due = activity.due(HEADER, quiet, Some((IDLE, start))).await;
        assert_eq!(due, Due::Expired("http_idle_timeout"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_begun_after_a_request_has_the_header_timeout_from_its_end() {
        let activity = Arc::new(Activity::new());
        drop(InFlight::new(Arc::clone(&activity)));
        activity.between_requests.store(false, Ordering::SeqCst);
        let quiet = Duration::from_secs(1);
        let start = Instant::now();
        loop {
            // As the HTTP/1 loop does: a quiet connection still holding part of a head stays
            // awake, and looks again a while later.
            let not_before = Instant::now() + quiet;
            match activity.due(HEADER, IDLE, Some((quiet, not_before))).await {
                Due::Quiet => continue,
                Due::Expired(name) => {
                    assert_eq!((name, start.elapsed()), ("http_header_timeout", HEADER));
                    break;
                }
            }
        }
        // Between requests, the idle timeout is the one that runs.
        activity.between_requests.store(true, Ordering::SeqCst);
        let due = activity.due(HEADER, IDLE, Some((IDLE * 2, start))).await;
        assert_eq!(
            (due, start.elapsed()),
            (Due::Expired("http_idle_timeout"), IDLE)
        );
    }
}
