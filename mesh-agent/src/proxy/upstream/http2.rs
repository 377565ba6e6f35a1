//! HTTP/2 (prior knowledge) to one endpoint of one cluster, for one source pod: one connection
//! multiplexes every request (`http2MaxRequests` bounds them, in the engine), so a request
//! waits only while that connection opens (counted against `http1MaxPendingRequests`, as
//! Envoy counts it) or when `tcp.maxConnections` keeps a retired connection's successor from
//! opening. After `maxRequestsPerConnection` streams a connection takes no new ones; hyper
//! closes it once its streams are done.

use std::{
    net::SocketAddr,
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use hyper::{body::Incoming, client::conn::http2, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{sync::Notify, time::Instant};
use tracing::debug;

use super::{
    body::{BoxError, ProxyBody},
    connection::{self, Dial, Owner},
    dial::Dialer,
    error::{self, Progress, SendError},
};
use crate::engine::{ClusterPool, Permit, PoolLimits};

type Sender = http2::SendRequest<ProxyBody>;

pub(super) struct Http2Pool {
    endpoint: SocketAddr,
    dialer: Dialer,
    state: Mutex<State>,
    /// The connection opened, failed to, or one closed: waiting requests look again.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// The connection new streams go to.
    active: Option<Active>,
    connecting: bool,
    /// Connections open or being opened (retired ones included until they close).
    open: usize,
    next_id: u64,
    /// Dials that failed so far: the requests waiting when one fails fail with it.
    failed_dials: u64,
}

struct Active {
    id: u64,
    sender: Sender,
    /// Streams opened on it so far.
    served: u32,
    /// Streams in flight.
    streams: u32,
    /// When `streams` last fell to 0.
    idle_since: Instant,
}

/// A stream of the active connection; dropping it ends the stream's count.
pub(super) struct Lease {
    pool: Arc<Http2Pool>,
    id: u64,
}

impl Http2Pool {
    pub(super) fn new(endpoint: SocketAddr, dialer: Dialer) -> Self {
        Http2Pool {
            endpoint,
            dialer,
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no connection is open or opening (the pool can be forgotten).
    pub(super) fn is_empty(&self) -> bool {
        self.lock().open == 0
    }

    /// Sends `request` as a stream of the active connection (opening one if needed; see the
    /// module docs); a request that may not wait fails with `Overflow` where it would have to.
    pub(super) async fn send(
        self: &Arc<Self>,
        cluster: ClusterPool<'_>,
        mut request: Request<ProxyBody>,
        may_wait: bool,
        progress: &mut Progress,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, lease, reused) = self.checkout(cluster, may_wait, progress).await?;
            *progress = Progress::Sent;
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, lease)),
                Err(failed) => {
                    request = error::unsent(failed, reused)?;
                    *progress = Progress::Waiting;
                }
            }
        }
    }

    /// A stream for one request, its lease, and whether its connection was open already.
    async fn checkout(
        self: &Arc<Self>,
        cluster: ClusterPool<'_>,
        may_wait: bool,
        progress: &mut Progress,
    ) -> Result<(Sender, Lease, bool), SendError> {
        let limits = cluster.limits();
        let mut pending: Option<(Permit, u64)> = None;
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            let slot = {
                let mut state = self.lock();
                if let Some((sender, id)) = state.open_stream(limits) {
                    return Ok((
                        sender,
                        Lease {
                            pool: Arc::clone(self),
                            id,
                        },
                        true,
                    ));
                }
                match &pending {
                    Some((_, failed_before)) if state.failed_dials != *failed_before => {
                        return Err(SendError::ConnectFailure);
                    }
                    Some(_) => {}
                    None if may_wait => {
                        let permit = cluster.try_pending().map_err(|_| SendError::Overflow)?;
                        pending = Some((permit, state.failed_dials));
                    }
                    None => {}
                }
                if state.connecting {
                    None
                } else {
                    let slot = match cluster.try_connection() {
                        Some(slot) => Some(slot),
                        // Envoy's guarantee: an endpoint the balancer picked gets a connection.
                        None if state.open == 0 => Some(cluster.connection_beyond_limit()),
                        None => None,
                    };
                    if slot.is_some() {
                        state.connecting = true;
                        state.open += 1;
                    }
                    slot
                }
            };
            if let Some(slot) = slot {
                let (sender, id) = self.dial(slot, limits, progress).await?;
                return Ok((
                    sender,
                    Lease {
                        pool: Arc::clone(self),
                        id,
                    },
                    false,
                ));
            }
            if !may_wait {
                return Err(SendError::Overflow);
            }
            changed.await;
        }
    }

    /// Opens the connection (counted in `open`, `connecting` set) within `tcp.connectTimeout`
    /// and makes it the active one, with this request's stream on it.
    async fn dial(
        self: &Arc<Self>,
        slot: Permit,
        limits: &PoolLimits,
        progress: &mut Progress,
    ) -> Result<(Sender, u64), SendError> {
        let mut opening = Opening {
            pool: self,
            state: Dial::Cancelled,
        };
        *progress = Progress::Connecting;
        let dialled: Result<_, BoxError> = match self
            .dialer
            .connect_within(self.endpoint, limits.connect_timeout)
            .await
        {
            Ok(stream) => http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(stream))
                .await
                .map_err(Into::into),
            Err(error) => Err(error.into()),
        };
        let (sender, connection) = match dialled {
            Ok(connection) => connection,
            Err(error) => {
                debug!(endpoint = %self.endpoint, %error, "upstream connect failed");
                opening.state = Dial::Failed;
                return Err(SendError::ConnectFailure);
            }
        };
        opening.state = Dial::Open;
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            state.connecting = false;
            let active = Active {
                id: state.next_id,
                sender: sender.clone(),
                served: 1,
                streams: 1,
                idle_since: Instant::now(),
            };
            let spent = limits
                .max_requests_per_connection
                .is_some_and(|max| active.served >= max);
            state.active = (!spent).then_some(active);
            state.next_id
        };
        drop(opening);
        self.changed.notify_waiters();
        let owner = Arc::downgrade(self);
        let life = connection::drive(
            Box::pin(connection),
            owner.clone(),
            id,
            limits.http_idle_timeout,
        );
        connection::spawn(owner, id, slot, life);
        Ok((sender, id))
    }

    fn forget(&self, id: Option<u64>, failed: bool) {
        {
            let mut state = self.lock();
            state.open -= 1;
            match id {
                Some(id) => {
                    if state.active.as_ref().is_some_and(|active| active.id == id) {
                        state.active = None;
                    }
                }
                None => state.connecting = false,
            }
            state.failed_dials += u64::from(failed);
        }
        self.changed.notify_waiters();
    }
}

impl State {
    /// A new stream on the active connection, if it can take one; retires it at
    /// `maxRequestsPerConnection`.
    fn open_stream(&mut self, limits: &PoolLimits) -> Option<(Sender, u64)> {
        let active = self.active.as_mut()?;
        if active.sender.is_closed() {
            self.active = None;
            return None;
        }
        active.served += 1;
        active.streams += 1;
        let stream = (active.sender.clone(), active.id);
        if limits
            .max_requests_per_connection
            .is_some_and(|max| active.served >= max)
        {
            self.active = None;
        }
        Some(stream)
    }
}

/// A connection being opened, counted in the pool: forgotten unless it opened.
struct Opening<'a> {
    pool: &'a Http2Pool,
    state: Dial,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        match self.state {
            Dial::Open => {}
            Dial::Failed => self.pool.forget(None, true),
            Dial::Cancelled => self.pool.forget(None, false),
        }
    }
}

impl Owner for Http2Pool {
    fn expire_idle(&self, id: u64, timeout: Duration, now: Instant) -> Result<(), Instant> {
        let mut state = self.lock();
        let due = match &state.active {
            Some(active) if active.id == id && active.streams == 0 => active.idle_since + timeout,
            // Busy, or retired (it closes when its streams are done).
            _ => return Err(now + timeout),
        };
        if due > now {
            return Err(due);
        }
        state.active = None;
        Ok(())
    }

    fn closed(&self, id: u64) {
        self.forget(Some(id), false);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Some(active) = state.active.as_mut().filter(|active| active.id == self.id) {
            active.streams -= 1;
            if active.streams == 0 {
                active.idle_since = Instant::now();
            }
        }
    }
}
