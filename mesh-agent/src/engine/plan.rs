//! One request's journey: tries, outcomes, retries, deadlines.
//!
//! The proxy drives a [`RequestPlan`] like this:
//!
//! ```text
//! let mut plan = engine.route(&info, now)?;           // Err: local reply (NR)
//! if let Some(answer) = plan.local_answer() { return answer }  // redirect, direct response
//! if let Some(d) = plan.delay() { sleep(d) }          // fault delay (DI)
//! plan.rewrite_request(&mut parts);
//! if let Some(mirror) = plan.mirror(now) { spawn copy to mirror.endpoint() }
//! loop {
//!     let attempt = plan.next_attempt(now)?;          // Err: local reply (UH, UO, FI, UT)
//!     // through the pool of plan.pool(): a connection, or wait for one (pending)
//!     let outcome = send(attempt.endpoint(), attempt.deadline()).await;
//!     // refused by the pool: plan.overflowed(attempt); timed out while waiting for a
//!     // connection: plan.report_unsent(attempt, Outcome::Timeout, now)
//!     match plan.report(attempt, outcome, now) {
//!         Verdict::Forward => { plan.rewrite_response(&mut resp.headers); return resp }
//!         Verdict::RetryAt(at) => sleep_until(at),
//!         Verdict::Fail(err) => return local_reply(err), // status, flags
//!     }
//! }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::uri::Authority;
use http::HeaderMap;

use super::balance::Tried;
use super::cluster::{Cluster, Destination};
use super::error::{EngineError, ResponseFlags, TryFailure};
use super::metrics::EngineMetrics;
use super::outlier::Observation;
use super::pool::{self, ClusterPool, Permit, PoolLimits, Slot};
use super::redirect::LocalAnswer;
use super::retry::{self, Outcome};
use super::rewrite;
use super::routing::UriMatched;
use super::snapshot::{Route, Snapshot};
use crate::identity::WorkloadIdentity;

/// A request's routing decision and retry state. Holds the snapshot it was routed on, so a
/// reload mid-request does not change its route.
#[derive(Debug)]
pub struct RequestPlan {
    snap: Arc<Snapshot>,
    route: u32,
    destination: u16,
    cluster: u32,
    matched: UriMatched,
    delay: Option<Duration>,
    abort: Option<u16>,
    mirror: Option<u32>,
    replayable: bool,
    rng: fastrand::Rng,
    tried: Tried,
    attempts: u32,
    retries: u32,
    /// The route timeout's deadline, fixed when the first try starts (after any fault delay).
    deadline: Option<Instant>,
    started: bool,
    retry_permit: Option<Permit>,
    flags: ResponseFlags,
    /// The route answers by itself; then `cluster` and `destination` mean nothing.
    local: Option<LocalAnswer>,
}

/// One try: where to send it and until when. Hand it back to [`RequestPlan::report`]; its
/// pool slot is released then (or when it is dropped).
#[derive(Debug)]
#[must_use = "report the attempt's outcome to the plan"]
pub struct Attempt {
    endpoint: SocketAddr,
    /// The workload at `endpoint`, if discovery knows its pod.
    workload: Option<Arc<WorkloadIdentity>>,
    index: u32,
    number: u32,
    deadline: Option<Instant>,
    /// Whether `deadline` is the route timeout's (so a timeout ends the request).
    request_bound: bool,
    _permit: Permit,
}

impl Attempt {
    /// The endpoint to send this try to.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The workload serving at [`Self::endpoint`] (for telemetry), if discovery knows its pod.
    pub fn workload(&self) -> Option<&Arc<WorkloadIdentity>> {
        self.workload.as_ref()
    }

    /// 1 for the first try, 2 for the first retry, …
    pub fn number(&self) -> u32 {
        self.number
    }

    /// When this try times out: the earlier of `perTryTimeout` and the route `timeout`
    /// (`None`: no limit). The proxy reports [`Outcome::Timeout`] when it passes.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// What the proxy does after a try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the try's response downstream (success, a non-retryable status, or the last
    /// response once retries are used up — then the flags say `URX`).
    Forward,
    /// Wait until this instant (backoff), then call [`RequestPlan::next_attempt`] again.
    RetryAt(Instant),
    /// Reply locally with this error's status; the try produced no response to forward.
    Fail(EngineError),
}

impl RequestPlan {
    #[expect(
        clippy::too_many_arguments,
        reason = "built in one place, by Engine::route"
    )]
    pub(crate) fn new(
        snap: Arc<Snapshot>,
        route: u32,
        destination: u16,
        cluster: u32,
        matched: UriMatched,
        delay: Option<Duration>,
        abort: Option<u16>,
        mirror: Option<u32>,
        replayable: bool,
        rng: fastrand::Rng,
    ) -> Self {
        let flags = if delay.is_some() {
            ResponseFlags::DI
        } else {
            ResponseFlags::NONE
        };
        RequestPlan {
            snap,
            route,
            destination,
            cluster,
            matched,
            delay,
            abort,
            mirror,
            replayable,
            rng,
            tried: Tried::default(),
            attempts: 0,
            retries: 0,
            deadline: None,
            started: false,
            retry_permit: None,
            flags,
            local: None,
        }
    }

    /// A plan whose route answers by itself: no destination, no tries.
    pub(crate) fn local(snap: Arc<Snapshot>, route: u32, answer: LocalAnswer) -> Self {
        RequestPlan {
            snap,
            route,
            destination: 0,
            cluster: u32::MAX,
            matched: UriMatched::Whole,
            delay: None,
            abort: None,
            mirror: None,
            replayable: false,
            // Never drawn from: nothing is balanced or backed off.
            rng: fastrand::Rng::with_seed(0),
            tried: Tried::default(),
            attempts: 0,
            retries: 0,
            deadline: None,
            started: false,
            retry_permit: None,
            flags: ResponseFlags::NONE,
            local: Some(answer),
        }
    }

    /// The answer when the route answers by itself (Gateway API redirects and direct
    /// responses). Check it first: such a plan has no destination, so send this answer (after
    /// [`Self::rewrite_response`]) and call nothing else of the plan; [`Self::destination`],
    /// [`Self::cluster_name`], [`Self::pool_limits`] and [`Self::pool`] would panic, and
    /// [`Self::next_attempt`] errs with `NR`.
    pub fn local_answer(&self) -> Option<&LocalAnswer> {
        self.local.as_ref()
    }

    fn route_ref(&self) -> &Route {
        &self.snap.routes[self.route as usize]
    }

    fn cluster_ref(&self) -> &Cluster {
        &self.snap.clusters[self.cluster as usize]
    }

    /// The name of the matched route (`namespace/virtual-service/route`, or `default`).
    pub fn route_name(&self) -> &str {
        &self.route_ref().name
    }

    /// The destination cluster, `outbound|port|subset|host`.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_ref().destination.cluster
    }

    /// Where the request goes: service, subset and cluster (clone it, no copy, for telemetry
    /// that outlives the plan).
    pub fn destination(&self) -> &Destination {
        &self.cluster_ref().destination
    }

    /// The cluster's pool settings (per-connection request limit, timeouts) for the proxy's
    /// connection pool.
    pub fn pool_limits(&self) -> &PoolLimits {
        &self.cluster_ref().limits
    }

    /// The destination cluster's pool: its limits and connection and pending slots.
    pub fn pool(&self) -> ClusterPool<'_> {
        cluster_pool(&self.snap, self.cluster)
    }

    /// The route's `timeout`, if it has one.
    pub fn timeout(&self) -> Option<Duration> {
        self.route_ref().timeout
    }

    /// Response flags so far (`DI`, `UO`, `URX`, …) for the access log.
    pub fn flags(&self) -> ResponseFlags {
        self.flags
    }

    /// Tries started so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The fault delay to wait before the first try (`DI`), if this request was chosen.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// Call when the body turned out not to be replayable (streamed past the buffer limit):
    /// the request will not be retried.
    pub fn mark_not_replayable(&mut self) {
        self.replayable = false;
    }

    /// Applies the route's `rewrite` and request header operations (destination level, then
    /// route level, so the route's `set` wins as in Envoy) to the outgoing request.
    pub fn rewrite_request(&self, parts: &mut Parts) {
        let route = self.route_ref();
        if let Some(rw) = &route.rewrite {
            rewrite::apply_rewrite(rw, self.matched, parts);
        }
        let destination = &route.destinations[usize::from(self.destination)];
        rewrite::apply_header_ops(&destination.headers.request, &mut parts.headers);
        rewrite::apply_header_ops(&route.headers.request, &mut parts.headers);
    }

    /// Applies the response header operations before the response goes downstream (a local
    /// answer too, as Envoy finalizes a direct response's headers with the route's).
    pub fn rewrite_response(&self, headers: &mut HeaderMap) {
        let route = self.route_ref();
        // A local answer's route has no destination, so only route-level operations.
        if let Some(destination) = route.destinations.get(usize::from(self.destination)) {
            rewrite::apply_header_ops(&destination.headers.response, headers);
        }
        rewrite::apply_header_ops(&route.headers.response, headers);
    }

    /// The endpoint of `attempt` as a URI authority (`ip:port`), made once per endpoint.
    pub fn authority(&self, attempt: &Attempt) -> &Authority {
        &self.snap.clusters[self.cluster as usize].endpoints[attempt.index as usize].authority
    }

    /// If this request is mirrored, the mirror endpoint to send a copy to.
    pub fn mirror_endpoint(&mut self, now: Instant) -> Option<SocketAddr> {
        self.mirror(now).map(|mirror| mirror.endpoint())
    }

    /// If this request is mirrored, where the copy goes: an endpoint picked by the mirror
    /// cluster's own balancer, and that cluster's pool. It owns what it refers to, so the copy
    /// can outlive the request.
    pub fn mirror(&mut self, now: Instant) -> Option<MirrorTarget> {
        let cluster = self.mirror?;
        let snap = &self.snap;
        let ticks = snap.epoch.ticks(now);
        let panic_ok = snap.settings.panic_when_all_ejected;
        let endpoint = snap.clusters[cluster as usize]
            .pick(
                &mut self.rng,
                &Tried::default(),
                panic_ok,
                ticks,
                &snap.metrics,
            )
            .ok()?;
        Some(MirrorTarget {
            snap: Arc::clone(snap),
            cluster,
            endpoint,
        })
    }

    /// Starts the next try: picks an endpoint (not ejected, preferring ones not tried yet),
    /// takes a request slot from the pool, and sets the try's deadline.
    pub fn next_attempt(&mut self, now: Instant) -> Result<Attempt, EngineError> {
        let result = self.start_attempt(now);
        if let Err(err) = &result {
            self.flags |= err.flags();
        }
        result
    }

    fn start_attempt(&mut self, now: Instant) -> Result<Attempt, EngineError> {
        // A caller that missed `local_answer`: there is nothing to try.
        if self.local.is_some() {
            return Err(EngineError::NoRoute);
        }
        if let Some(status) = self.abort {
            return Err(EngineError::FaultAbort { status });
        }
        if !self.started {
            self.started = true;
            self.deadline = self.route_ref().timeout.map(|t| now + t);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(EngineError::RequestTimeout);
        }
        let snap = Arc::clone(&self.snap);
        let cluster = &snap.clusters[self.cluster as usize];
        let metrics = &snap.metrics;
        let ticks = snap.epoch.ticks(now);
        let index = cluster.pick(
            &mut self.rng,
            &self.tried,
            snap.settings.panic_when_all_ejected,
            ticks,
            metrics,
        )?;
        let endpoint = &cluster.endpoints[index as usize];
        let permit = pool::acquire(
            &cluster.shared.pool,
            Slot::Request,
            cluster.limits.max_requests,
            Some(&endpoint.state),
        )
        .inspect_err(|_| {
            EngineMetrics::inc(&metrics.pool_overflow);
            EngineMetrics::inc(&cluster.events.pool_overflows);
        })?;
        self.tried.push(index);
        self.attempts += 1;
        let per_try = self.route_ref().retry.per_try_timeout.map(|t| now + t);
        let deadline = match (per_try, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Attempt {
            endpoint: endpoint.addr,
            workload: endpoint.workload.clone(),
            index,
            number: self.attempts,
            request_bound: deadline.is_some() && deadline == self.deadline,
            deadline,
            _permit: permit,
        })
    }

    /// Reports how a try ended and says what to do next. Feeds outlier detection, releases the
    /// try's pool slot and applies the retry policy, the retry budget and `maxRetries`.
    pub fn report(&mut self, attempt: Attempt, outcome: Outcome, now: Instant) -> Verdict {
        self.conclude(attempt, outcome, now, true)
    }

    /// As [`Self::report`], for a try that never reached its endpoint: it timed out while
    /// waiting in the pool for a connection. Retries and timeouts apply as usual, but outlier
    /// detection learns nothing: the endpoint was never asked (Envoy reports no result for a
    /// request still pending either).
    pub fn report_unsent(&mut self, attempt: Attempt, outcome: Outcome, now: Instant) -> Verdict {
        self.conclude(attempt, outcome, now, false)
    }

    /// Ends a try the pool refused (over `http1MaxPendingRequests`; the pool counted it): the
    /// request fails with 503 `UO`, without a retry (as Envoy never retries an overflow) and
    /// without a word to outlier detection.
    pub fn overflowed(&mut self, attempt: Attempt) -> Verdict {
        drop(attempt);
        self.retry_permit = None;
        self.fail(EngineError::Overflow)
    }

    fn conclude(
        &mut self,
        attempt: Attempt,
        outcome: Outcome,
        now: Instant,
        observe: bool,
    ) -> Verdict {
        let request_bound = attempt.request_bound;
        let index = attempt.index;
        drop(attempt);
        // The retry this try was (if any) is over.
        self.retry_permit = None;

        let snap = Arc::clone(&self.snap);
        let cluster = &snap.clusters[self.cluster as usize];
        let metrics = &snap.metrics;
        let ticks = snap.epoch.ticks(now);
        if observe {
            cluster.observe(index, observation(outcome), ticks, metrics);
        }

        if outcome == Outcome::Timeout && request_bound {
            return self.fail(EngineError::RequestTimeout);
        }
        let policy = &snap.routes[self.route as usize].retry;
        if policy.attempts == 0 || !policy.conditions.matches(outcome) || !self.replayable {
            return self.finish(outcome, false);
        }
        if self.retries >= policy.attempts {
            return self.finish(outcome, true);
        }
        let settings = &snap.settings;
        let wait = retry::backoff(
            self.retries + 1,
            settings.retry_base_interval,
            settings.retry_max_interval,
            &mut self.rng,
        );
        let at = now + wait;
        if self.deadline.is_some_and(|d| at >= d) {
            // The route timeout would fire during the backoff: answer now, as Envoy would then.
            return self.fail(EngineError::RequestTimeout);
        }
        let Ok(permit) = pool::acquire(
            &cluster.shared.pool,
            Slot::Retry,
            cluster.limits.max_retries,
            None,
        ) else {
            EngineMetrics::inc(&metrics.retry_overflow);
            self.flags |= ResponseFlags::UO;
            return self.finish(outcome, false);
        };
        if !cluster.budget.try_retry(&settings.retry_budget, ticks) {
            EngineMetrics::inc(&metrics.retry_budget_exhausted);
            EngineMetrics::inc(&cluster.events.retry_budget_exhausted);
            self.flags |= ResponseFlags::UO;
            return self.finish(outcome, false);
        }
        self.retry_permit = Some(permit);
        self.retries += 1;
        EngineMetrics::inc(&metrics.retries);
        EngineMetrics::inc(&cluster.events.retries);
        Verdict::RetryAt(at)
    }

    /// The verdict when no retry follows.
    fn finish(&mut self, outcome: Outcome, exhausted: bool) -> Verdict {
        if exhausted {
            self.flags |= ResponseFlags::URX;
        }
        let failure = match outcome {
            Outcome::Response { .. } => return Verdict::Forward,
            Outcome::ConnectFailure => TryFailure::ConnectFailure,
            Outcome::RefusedStream | Outcome::Reset => TryFailure::Reset,
            Outcome::Timeout => TryFailure::Timeout,
        };
        let err = match (exhausted, failure) {
            (true, failure) => EngineError::RetriesExhausted(failure),
            (false, TryFailure::ConnectFailure) => EngineError::ConnectFailure,
            (false, TryFailure::Reset) => EngineError::UpstreamReset,
            (false, TryFailure::Timeout) => EngineError::PerTryTimeout,
        };
        self.fail(err)
    }

    fn fail(&mut self, err: EngineError) -> Verdict {
        self.flags |= err.flags();
        Verdict::Fail(err)
    }

    /// Takes a connection slot (`tcp.maxConnections`) for a new upstream connection of this
    /// request's cluster; hold it as long as the connection is open.
    pub fn try_connection(&self) -> Result<Permit, EngineError> {
        self.pool().try_connection().ok_or(EngineError::Overflow)
    }

    /// Takes a pending slot (`http.http1MaxPendingRequests`) while waiting for a connection;
    /// drop it once a connection is assigned.
    pub fn try_pending(&self) -> Result<Permit, EngineError> {
        self.pool().try_pending()
    }
}

/// Where a mirrored copy goes (see [`RequestPlan::mirror`]).
#[derive(Debug)]
pub struct MirrorTarget {
    snap: Arc<Snapshot>,
    cluster: u32,
    endpoint: u32,
}

impl MirrorTarget {
    fn endpoint_ref(&self) -> &super::endpoint::ClusterEndpoint {
        &self.snap.clusters[self.cluster as usize].endpoints[self.endpoint as usize]
    }

    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint_ref().addr
    }

    /// The endpoint as a URI authority (`ip:port`).
    pub fn authority(&self) -> &Authority {
        &self.endpoint_ref().authority
    }

    /// The mirror cluster's pool.
    pub fn pool(&self) -> ClusterPool<'_> {
        cluster_pool(&self.snap, self.cluster)
    }

    /// Counts a copy the proxy did not send: no connection was free at once, or too many
    /// copies were in flight already.
    pub fn dropped(&self) {
        EngineMetrics::inc(&self.snap.metrics.mirror_dropped);
    }
}

fn cluster_pool(snap: &Snapshot, cluster: u32) -> ClusterPool<'_> {
    let cluster = &snap.clusters[cluster as usize];
    ClusterPool {
        limits: &cluster.limits,
        counters: &cluster.shared.pool,
        overflows: [&snap.metrics.pool_overflow, &cluster.events.pool_overflows],
    }
}

fn observation(outcome: Outcome) -> Observation {
    match outcome {
        Outcome::Response { status, .. } => Observation::Status(status),
        Outcome::Timeout => Observation::LocalTimeout,
        Outcome::ConnectFailure | Outcome::RefusedStream | Outcome::Reset => {
            Observation::LocalFailure
        }
    }
}
