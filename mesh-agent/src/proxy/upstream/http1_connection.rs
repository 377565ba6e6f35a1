//! The life of one pooled HTTP/1.1 upstream connection: awake, hyper drives it; idle for
//! [`SLEEP_AFTER`], it sleeps — hyper's connection is taken apart and only the socket is held,
//! watched for the upstream's close — until a request wakes it with a new hyper connection on
//! the same socket. An awake connection holds hyper's 8 KiB write buffer, its 8 to 16 KiB read
//! buffer and its request channel; a sleeping one its socket and its task (about 1 KiB: hyper's
//! connection is boxed, so the task has no room for it), 30 KiB of heap less (64 connections
//! idle after a burst: 3.6 → 1.6 MiB; with the read buffer dropped and the connection boxed, 69
//! pooled connections at 1,000 rps: 2.09 → 1.40 MB). The pool keeps a sleeping connection in
//! its idle list like an awake one, so the idle timeout, `maxConnections` and most recently
//! used first see no difference. The downstream side sleeps the same way
//! (`proxy::http::downstream`).

use std::{sync::Weak, time::Duration};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncReadExt, sync::oneshot, time::Instant};
use tracing::debug;

use super::{
    body::ProxyBody,
    connection::{self, Owner},
    dial::UpstreamIo,
};
use crate::engine::Permit;

pub(super) type Sender = http1::SendRequest<ProxyBody>;
pub(super) type Connection = http1::Connection<TokioIo<UpstreamIo>, ProxyBody>;

/// How long a connection stays awake with no request: long enough that a busy connection
/// never sleeps between two requests, short enough that a burst's connections give their
/// buffers back soon after it.
pub(super) const SLEEP_AFTER: Duration = Duration::from_secs(1);

/// What a sleeping connection's place in the idle list holds: the request that takes it sends
/// where the woken connection's sender is to go ([`wake`]).
pub(super) type Wake = oneshot::Sender<oneshot::Sender<Sender>>;

/// What a sleeping connection waits on.
pub(super) type Waking = oneshot::Receiver<oneshot::Sender<Sender>>;

/// What an HTTP/1 connection's task asks of its pool besides the idle timeout.
pub(super) trait Sleeps: Owner {
    /// At a check, `now`: when connection `id` has sat idle for [`SLEEP_AFTER`], its sender,
    /// and its place in the idle list waits on the [`Waking`] returned; otherwise (in use, or
    /// idle for less) when to check again.
    fn fall_asleep(&self, id: u64, now: Instant) -> Result<(Sender, Waking), Instant>;
}

/// Wakes a sleeping connection for one request: its new sender, ready; `None` when it closed
/// meanwhile (the upstream closed it, or its idle timeout came first).
pub(super) async fn wake(wake: Wake) -> Option<Sender> {
    let (reply, woken) = oneshot::channel();
    wake.send(reply).ok()?;
    let mut sender = woken.await.ok()?;
    sender.ready().await.ok()?;
    Some(sender)
}

/// Spawns the task of connection `id`, just opened, as [`connection::spawn`] does.
pub(super) fn spawn<O: Sleeps>(
    connection: Connection,
    owner: Weak<O>,
    id: u64,
    idle_timeout: Option<Duration>,
    slot: Permit,
) {
    let life = live(Box::new(connection), owner.clone(), id, idle_timeout);
    connection::spawn(owner, id, slot, life);
}

/// Awake and asleep by turns until the connection closes.
async fn live<O: Sleeps>(
    mut connection: Box<Connection>,
    owner: Weak<O>,
    id: u64,
    idle_timeout: Option<Duration>,
) {
    loop {
        let Some((sender, waking)) = awake(&mut connection, &owner, id, idle_timeout).await else {
            return;
        };
        // Moved out of its box in a block of its own, so the box is freed before the sleep.
        let http1::Parts { io, read_buf, .. } = {
            let boxed = connection;
            (*boxed).into_parts()
        };
        // Only now: hyper ends a connection whose senders are all gone.
        drop(sender);
        if !read_buf.is_empty() {
            debug!(
                id,
                "upstream HTTP/1 connection closed: bytes no request asked for"
            );
            return;
        }
        // Even empty, it holds hyper's read buffer, which would sleep with the socket.
        drop(read_buf);
        let Some((reply, io)) = asleep(io.into_inner(), waking, &owner, id, idle_timeout).await
        else {
            return;
        };
        let Ok((sender, woken)) = http1::handshake(TokioIo::new(io)).await else {
            return;
        };
        connection = Box::new(woken);
        if reply.send(sender).is_err() {
            // The request that woke it went away: closed with its task.
            return;
        }
    }
}

/// Drives `connection` until it ends (`None`), its idle timeout closes it (`None`), or it has
/// been idle long enough to sleep: then its sender and what it waits on asleep.
async fn awake<O: Sleeps>(
    connection: &mut Connection,
    owner: &Weak<O>,
    id: u64,
    idle_timeout: Option<Duration>,
) -> Option<(Sender, Waking)> {
    // A connection closed for idleness within a second need not sleep first.
    let closes_first = idle_timeout.filter(|&timeout| timeout <= SLEEP_AFTER);
    let first = Instant::now() + closes_first.unwrap_or(SLEEP_AFTER);
    connection::drive_until(connection, owner, first, |pool, now| match closes_first {
        Some(timeout) => pool.expire_idle(id, timeout, now).map(|()| None),
        None => pool.fall_asleep(id, now).map(Some),
    })
    .await
    .flatten()
}

/// What ends a connection's sleep.
enum Woken {
    /// A request takes it: its sender goes there.
    Request(oneshot::Sender<Sender>),
    /// Closed: the pool forgot it, or the upstream closed it or sent bytes no request asked for.
    Closed,
    /// Time to ask the pool about the idle timeout.
    Check,
}

/// Holds the socket until a request wakes the connection (`Some`), the upstream closes it or
/// its idle timeout does (`None`).
async fn asleep<O: Sleeps>(
    mut io: UpstreamIo,
    mut waking: Waking,
    owner: &Weak<O>,
    id: u64,
    idle_timeout: Option<Duration>,
) -> Option<(oneshot::Sender<Sender>, UpstreamIo)> {
    let mut check = idle_timeout.map(|timeout| Instant::now() + timeout);
    loop {
        let mut byte = [0; 1];
        let woken = tokio::select! {
            // Before a request's wake: a socket already closed is not handed to it.
            biased;
            _ = io.read(&mut byte) => Woken::Closed,
            woken = &mut waking => woken.map_or(Woken::Closed, Woken::Request),
            () = sleep_until_some(check) => Woken::Check,
        };
        match woken {
            Woken::Request(reply) => return Some((reply, io)),
            Woken::Closed => return None,
            Woken::Check => {
                let pool = owner.upgrade()?;
                let timeout = idle_timeout?;
                match pool.expire_idle(id, timeout, Instant::now()) {
                    Ok(()) => return None,
                    Err(next) => check = Some(next),
                }
            }
        }
    }
}

/// Until `deadline`; forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Mutex,
        },
    };

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::{server::conn::http1 as server, service::service_fn};
    use tokio::{
        io::AsyncWriteExt,
        net::{TcpListener, TcpStream},
        sync::Notify,
    };

    use super::*;
    use crate::proxy::upstream::body::BoxError;

    /// A pool of one connection: idle (given back at `since`) with its sender, asleep with its
    /// wake, or in use.
    #[derive(Default)]
    struct OnePool {
        idle: Mutex<Option<Given>>,
        closed: Notify,
        is_closed: std::sync::atomic::AtomicBool,
    }

    /// The connection given back: awake with its sender or asleep with its wake.
    struct Given {
        since: Instant,
        sender: Option<Sender>,
        wake: Option<Wake>,
    }

    impl OnePool {
        fn give_back(&self, sender: Sender) {
            *self.idle.lock().unwrap() = Some(Given {
                since: Instant::now(),
                sender: Some(sender),
                wake: None,
            });
        }

        fn is_asleep(&self) -> bool {
            let idle = self.idle.lock().unwrap();
            idle.as_ref()
                .is_some_and(|idle| idle.sender.is_none() && idle.wake.is_some())
        }

        fn take_wake(&self) -> Wake {
            let idle = self.idle.lock().unwrap().take().expect("idle");
            idle.wake.expect("asleep")
        }

        async fn until_closed(&self) {
            let closed = self.closed.notified();
            if !self.is_closed.load(Ordering::SeqCst) {
                closed.await;
            }
        }
    }

    impl Owner for OnePool {
        fn expire_idle(&self, _: u64, timeout: Duration, now: Instant) -> Result<(), Instant> {
            Err(now + timeout)
        }

        fn closed(&self, _: u64) {
            self.is_closed.store(true, Ordering::SeqCst);
            self.closed.notify_waiters();
        }
    }

    impl Sleeps for OnePool {
        fn fall_asleep(&self, _: u64, now: Instant) -> Result<(Sender, Waking), Instant> {
            let mut idle = self.idle.lock().unwrap();
            let Some(idle) = idle.as_mut() else {
                return Err(now + SLEEP_AFTER);
            };
            match idle.sender.take() {
                Some(sender) if idle.since + SLEEP_AFTER <= now => {
                    let (wake, waking) = oneshot::channel();
                    idle.wake = Some(wake);
                    Ok((sender, waking))
                }
                sender => {
                    idle.sender = sender;
                    Err(idle.since + SLEEP_AFTER)
                }
            }
        }
    }

    /// An HTTP/1.1 server on loopback that counts the connections it accepts and the requests
    /// it answers.
    async fn counting_server() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepts, answers) = (Arc::clone(&accepted), Arc::clone(&answered));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                let answers = Arc::clone(&answers);
                let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                    answers.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }
                });
                tokio::spawn(
                    server::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, accepted, answered)
    }

    async fn open(addr: std::net::SocketAddr, pool: &Arc<OnePool>) -> Sender {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = http1::handshake(TokioIo::new(UpstreamIo::Plain(stream)))
            .await
            .unwrap();
        let owner = Arc::downgrade(pool);
        tokio::spawn(async move {
            live(Box::new(connection), owner.clone(), 1, None).await;
            owner.upgrade().unwrap().closed(1);
        });
        sender
    }

    /// A sleeping connection's task keeps the room its awake states need (a future's size is
    /// its largest state's), so those stay out of it: hyper's connection is boxed. Its read
    /// buffer was kept asleep too until it was dropped before sleeping; measured in the bench's
    /// agent at 1,000 rps with 69 pooled connections, both together: heap 2.09 → 1.40 MB.
    #[tokio::test]
    async fn a_sleeping_connections_task_is_small() {
        let (addr, _, _) = counting_server().await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (_sender, connection) = http1::handshake(TokioIo::new(UpstreamIo::Plain(stream)))
            .await
            .unwrap();
        let pool = Arc::new(OnePool::default());
        let task = live(Box::new(connection), Arc::downgrade(&pool), 1, None);
        // Measured 472 bytes in the test build, 1,816 with hyper's connection inline (the
        // release build's task: 3,840 bytes then, in the 1,280-byte size class now).
        assert!(size_of_val(&task) <= 640, "{} bytes", size_of_val(&task));
    }

    async fn get(sender: &mut Sender) -> String {
        sender.ready().await.unwrap();
        let body = Empty::<Bytes>::new().map_err(|never| -> BoxError { match never {} });
        let request = Request::get("/")
            .header("host", "upstream")
            .body(ProxyBody::boxed(body));
        let response = sender.send_request(request.unwrap()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_sleeps_and_a_request_wakes_it_on_the_same_socket() {
        let (addr, accepted, answered) = counting_server().await;
        let pool = Arc::new(OnePool::default());
        let mut sender = open(addr, &pool).await;
        assert_eq!(get(&mut sender).await, "ok");
        pool.give_back(sender);
        tokio::time::sleep(SLEEP_AFTER / 2).await;
        assert!(!pool.is_asleep(), "asleep after half a second");
        tokio::time::sleep(SLEEP_AFTER).await;
        assert!(
            pool.is_asleep(),
            "awake after {:?} idle",
            SLEEP_AFTER * 3 / 2
        );

        let mut sender = wake(pool.take_wake()).await.expect("woken");
        assert_eq!(get(&mut sender).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "a new connection was opened"
        );
        assert_eq!(answered.load(Ordering::SeqCst), 2);
        // And it sleeps again once idle.
        pool.give_back(sender);
        tokio::time::sleep(SLEEP_AFTER * 2).await;
        assert!(pool.is_asleep());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_connection_the_upstream_closes_is_closed_and_wakes_for_no_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Arc::new(OnePool::default());
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0; 1024];
            let _ = stream.read(&mut head).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            // A server's keep-alive timeout, longer than the client's wait before sleeping.
            tokio::time::sleep(SLEEP_AFTER * 3).await;
        });
        let mut sender = open(addr, &pool).await;
        assert_eq!(get(&mut sender).await, "ok");
        pool.give_back(sender);
        tokio::time::sleep(SLEEP_AFTER * 2).await;
        assert!(pool.is_asleep());
        server.await.unwrap();
        tokio::time::timeout(SLEEP_AFTER, pool.until_closed())
            .await
            .expect("the closed connection's task ended");
        assert!(wake(pool.take_wake()).await.is_none());
    }
}
