//! The running agent's side: answer a successor on the handover socket, hand over what every
//! [`Source`] holds, and tell the rest of the agent when the successor takes over.
//!
//! One thread accepts; each successor's session runs on a thread of its own, so a second one
//! hears at once that another is taking over (`Busy`). The acceptor sleeps until a successor
//! connects or the server stops (an eventfd wakes it), so an idle agent's handover costs no
//! wake-ups.

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    wire::{timed_out, Conn},
    AgentInfo, Handed, Message, Refusal, Source, PROTOCOL,
};

/// How often a session's thread, blocked on its successor, looks whether the server is
/// stopping; and the most an accept blocks when the successor, which shares the handover
/// socket, took the connection that woke the acceptor.
const POLL: Duration = Duration::from_millis(50);
/// How long a successor that connected may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the rest of the agent may take to stop accepting once told to.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A successor's request to take over; answer with [`TakeOver::released`] once this agent no
/// longer accepts, or [`TakeOver::refuse`].
pub struct TakeOver {
    pub successor: AgentInfo,
    reply: mpsc::SyncSender<Result<(), Refusal>>,
}

impl TakeOver {
    pub fn released(self) {
        let _ = self.reply.send(Ok(()));
    }

    pub fn refuse(self, refusal: Refusal) {
        let _ = self.reply.send(Err(refusal));
    }
}

/// Where the server is, shared by its threads and the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a successor.
    Idle,
    /// A successor has (or is being given) the inventory.
    Handing,
    /// Shutting down without a successor: hellos are refused.
    ShuttingDown,
    /// Taken over: nothing more to serve.
    Released,
}

struct Shared {
    me: AgentInfo,
    sources: Vec<Arc<dyn Source>>,
    phase: Mutex<Phase>,
    stop: AtomicBool,
    /// Written when `stop` is set: wakes the acceptor.
    wake: OwnedFd,
    /// The acceptor's thread, for a test to watch it sleep.
    #[cfg(test)]
    acceptor_tid: std::sync::OnceLock<i32>,
    /// The session under way, to wake it when the server stops.
    session: Mutex<Option<Conn>>,
    sessions: Mutex<Vec<JoinHandle<()>>>,
    /// Set once the acceptor no longer accepts.
    acceptor_done: Mutex<bool>,
    acceptor_stopped: Condvar,
    events: tokio::sync::mpsc::UnboundedSender<TakeOver>,
}

impl Shared {
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// No more accepts, nor sessions past their next look at `stopping`.
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Cannot fail short of the counter's overflow, which one write a stop cannot reach.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// The handover server of a running agent.
pub struct Server {
    shared: Arc<Shared>,
    events: tokio::sync::mpsc::UnboundedReceiver<TakeOver>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves successors on `listener` (a bound, listening `SOCK_SEQPACKET` socket) from now
    /// on; each gets what `sources` hand over.
    pub fn start(
        listener: OwnedFd,
        me: AgentInfo,
        sources: Vec<Arc<dyn Source>>,
    ) -> std::io::Result<Server> {
        Conn::set_accept_timeout(listener.as_fd(), POLL)?;
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            me,
            sources,
            phase: Mutex::new(Phase::Idle),
            stop: AtomicBool::new(false),
            wake: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            #[cfg(test)]
            acceptor_tid: std::sync::OnceLock::new(),
            session: Mutex::new(None),
            sessions: Mutex::new(Vec::new()),
            acceptor_done: Mutex::new(false),
            acceptor_stopped: Condvar::new(),
            events,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("handover".into())
                .spawn(move || accept(&shared, listener))?
        };
        Ok(Server {
            shared,
            events: receiver,
            acceptor: Some(acceptor),
        })
    }

    /// Resolves when a successor takes over.
    pub async fn taken_over(&mut self) -> Option<TakeOver> {
        self.events.recv().await
    }

    /// This agent is shutting down on its own: later successors are refused. `true` if one
    /// already holds the inventory, whose take-over the caller should then wait for a little.
    pub fn shutting_down(&self) -> bool {
        let mut phase = self.shared.phase();
        match *phase {
            Phase::Handing => true,
            Phase::Idle => {
                *phase = Phase::ShuttingDown;
                false
            }
            Phase::ShuttingDown | Phase::Released => false,
        }
    }

    /// Ends every thread: a session under way ends as if its successor had gone (sources
    /// thawed), and the socket is closed.
    pub fn stop(mut self) {
        self.shared.stop();
        *self.shared.phase() = Phase::ShuttingDown;
        // A session waiting for our answer to its take-over gets "shutting down".
        self.events.close();
        while let Ok(take_over) = self.events.try_recv() {
            take_over.refuse(Refusal::ShuttingDown);
        }
        if let Some(conn) = &*self
            .shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            conn.shutdown();
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let sessions = std::mem::take(
            &mut *self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for session in sessions {
            let _ = session.join();
        }
    }
}

/// Accepts successors until the server stops; then says so, and closes its copy of the
/// listener (the successor's own copy goes on listening).
fn accept(shared: &Arc<Shared>, listener: OwnedFd) {
    #[cfg(test)]
    let _ = shared
        .acceptor_tid
        .set(rustix::thread::gettid().as_raw_nonzero().get());
    while !shared.stopping() {
        match successor_or_stop(shared, listener.as_fd()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                warn!(%error, "handover socket: cannot wait for a successor");
                pause();
                continue;
            }
        }
        let conn = match Conn::accept(listener.as_fd()) {
            Ok(conn) => conn,
            Err(error) if timed_out(&error) => continue,
            Err(error) => {
                warn!(%error, "handover socket: accept failed");
                pause();
                continue;
            }
        };
        let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|session| !session.is_finished());
        let session_shared = Arc::clone(shared);
        match std::thread::Builder::new()
            .name("handover-session".into())
            .spawn(move || session(&session_shared, conn))
        {
            Ok(thread) => sessions.push(thread),
            Err(error) => warn!(%error, "handover: cannot start a session"),
        }
    }
    drop(listener);
    *shared
        .acceptor_done
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = true;
    shared.acceptor_stopped.notify_all();
}

/// Sleeps until a successor connects (`true`) or the server stops.
fn successor_or_stop(shared: &Shared, listener: BorrowedFd<'_>) -> std::io::Result<bool> {
    let mut fds = [
        PollFd::new(&listener, PollFlags::IN),
        PollFd::new(&shared.wake, PollFlags::IN),
    ];
    match poll(&mut fds, None) {
        Ok(_) => Ok(!fds[0].revents().is_empty() && fds[1].revents().is_empty()),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// After a failed accept (out of descriptors, say): not a spin.
#[expect(
    clippy::disallowed_methods,
    reason = "the handover's own thread, which carries no connection"
)]
fn pause() {
    std::thread::sleep(POLL);
}

/// One successor, from hello to released (or to its going away).
fn session(shared: &Shared, conn: Conn) {
    let (pid, uid) = match conn.peer() {
        Ok(peer) => peer,
        Err(error) => {
            warn!(%error, "handover: cannot tell who connected");
            return;
        }
    };
    if uid != rustix::process::geteuid().as_raw() {
        warn!(pid, uid, "handover: refused a process of another user");
        return;
    }
    if let Err(error) = conn.set_timeout(POLL) {
        warn!(%error, "handover socket");
        return;
    }
    let Some(successor) = hello(shared, &conn) else {
        return;
    };
    let refuse = |refusal: Refusal| {
        info!(successor = pid, %refusal, "refused to hand over");
        let _ = conn.send(&Message::Refused { refusal }, &[]);
    };
    if let Some(why) = shared.me.mismatch(&successor) {
        return refuse(Refusal::Mismatch(format!(
            "this agent cannot hand over to it: {why}; stop this agent first"
        )));
    }
    {
        let mut phase = shared.phase();
        match *phase {
            Phase::Idle => *phase = Phase::Handing,
            Phase::Handing => return refuse(Refusal::Busy),
            Phase::ShuttingDown | Phase::Released => return refuse(Refusal::ShuttingDown),
        }
    }
    if let Ok(mut session) = shared.session.lock() {
        *session = conn.try_clone().ok();
    }
    let released = hand_over(shared, &conn, &successor);
    if let Ok(mut session) = shared.session.lock() {
        *session = None;
    }
    let mut phase = shared.phase();
    if released {
        *phase = Phase::Released;
        shared.stop();
    } else {
        for source in &shared.sources {
            source.thaw();
        }
        if *phase == Phase::Handing {
            *phase = Phase::Idle;
        }
    }
}

/// Waits for the successor's hello; `None` if it did not say one in time, or not a valid one.
fn hello(shared: &Shared, conn: &Conn) -> Option<AgentInfo> {
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        match conn.recv() {
            Ok((Message::Hello { protocol, agent }, _)) if protocol == PROTOCOL => {
                return Some(agent)
            }
            Ok((Message::Hello { protocol, .. }, _)) => {
                let refusal = Refusal::Protocol(protocol);
                let _ = conn.send(&Message::Refused { refusal }, &[]);
                return None;
            }
            Ok((other, _)) => {
                warn!(message = ?other, "handover: expected a hello");
                return None;
            }
            Err(error) if timed_out(&error) => {
                if shared.stopping() || Instant::now() > deadline {
                    return None;
                }
            }
            Err(error) => {
                warn!(%error, "handover: no hello");
                return None;
            }
        }
    }
}

/// Sends the inventory and waits for the successor to take over; `true` once it has and this
/// agent has stopped accepting.
fn hand_over(shared: &Shared, conn: &Conn, successor: &AgentInfo) -> bool {
    let mut entries: Vec<Handed> = Vec::new();
    for source in &shared.sources {
        match source.handed() {
            Ok(handed) => entries.extend(handed),
            Err(error) => {
                warn!(%error, "handover: cannot gather what to hand over");
                let refusal =
                    Refusal::Mismatch(format!("cannot gather what to hand over: {error}"));
                let _ = conn.send(&Message::Refused { refusal }, &[]);
                return false;
            }
        }
    }
    let sent = conn
        .send(
            &Message::Inventory {
                protocol: PROTOCOL,
                agent: shared.me.clone(),
                entries: entries.len(),
            },
            &[],
        )
        .and_then(|()| conn.send_entries(&entries));
    // Our copies go now; the successor has its own.
    drop(entries);
    if let Err(error) = sent {
        warn!(successor = successor.pid, %error, "handover: could not send the inventory");
        return false;
    }
    info!(
        successor = successor.pid,
        version = %successor.version,
        "handed the inventory to a successor; serving until it takes over"
    );
    loop {
        match conn.recv() {
            Ok((Message::TakeOver, _)) => return take_over(shared, conn, successor),
            Ok((Message::Abort { reason }, _)) => {
                info!(successor = successor.pid, %reason, "the successor gave up; serving on");
                return false;
            }
            Ok((other, _)) => {
                warn!(message = ?other, "handover: expected take-over or abort");
                return false;
            }
            Err(error) if timed_out(&error) => {
                if shared.stopping() {
                    return false;
                }
            }
            Err(_) => {
                info!(
                    successor = successor.pid,
                    "the successor went away before taking over; serving on"
                );
                return false;
            }
        }
    }
}

fn take_over(shared: &Shared, conn: &Conn, successor: &AgentInfo) -> bool {
    // From here the session waits for the agent's answer, not for the successor: stopping the
    // server must not cut the connection before `Released` is sent.
    if let Ok(mut session) = shared.session.lock() {
        *session = None;
    }
    let (reply, answer) = mpsc::sync_channel(1);
    let request = TakeOver {
        successor: successor.clone(),
        reply,
    };
    let outcome = match shared.events.send(request) {
        Ok(()) => answer
            .recv_timeout(RELEASE_TIMEOUT)
            .unwrap_or(Err(Refusal::ShuttingDown)),
        Err(_) => Err(Refusal::ShuttingDown),
    };
    match outcome {
        Ok(()) => {
            // The handover socket is the successor's from here: not one more accept of ours
            // on it, before the successor hears it may start serving it.
            shared.stop();
            let done = shared
                .acceptor_done
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let _ = shared
                .acceptor_stopped
                .wait_timeout_while(done, RELEASE_TIMEOUT, |done| !*done);
            let _ = conn.send(&Message::Released, &[]);
            info!(successor = successor.pid, "taken over: no longer accepting");
            true
        }
        Err(refusal) => {
            let _ = conn.send(&Message::Refused { refusal }, &[]);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::fd::OwnedFd,
        path::{Path, PathBuf},
        sync::atomic::AtomicUsize,
    };

    use serde_json::json;

    use super::*;
    use crate::{
        handover::{take, HandoverError},
        socket_file::SocketFile,
    };

    /// Hands over one pipe, and counts how often it was frozen and thawed.
    #[derive(Default)]
    struct Pipe {
        frozen: AtomicUsize,
        thawed: AtomicUsize,
    }

    impl Source for Pipe {
        fn handed(&self) -> std::io::Result<Vec<Handed>> {
            self.frozen.fetch_add(1, Ordering::SeqCst);
            let (read, _write) = std::io::pipe()?;
            Ok(vec![Handed::new(
                "listener/test",
                json!({"n": 1}),
                vec![OwnedFd::from(read)],
            )])
        }

        fn thaw(&self) {
            self.thawed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn agent(pid: u32, cgroup: &str) -> AgentInfo {
        AgentInfo {
            pid,
            version: "test".to_owned(),
            redirect: "ebpf".to_owned(),
            cgroup: Some(PathBuf::from(cgroup)),
            listen: "127.0.0.1:15001".parse().unwrap(),
            netns_cookie: 1,
        }
    }

    fn serving(dir: &Path, source: &Arc<Pipe>) -> (Server, PathBuf) {
        let path = dir.join("handover.sock");
        let (_file, listener) = SocketFile::bind_seqpacket(&path).unwrap();
        let sources: Vec<Arc<dyn Source>> = vec![Arc::clone(source) as Arc<dyn Source>];
        (
            Server::start(listener, agent(1, "/cg"), sources).unwrap(),
            path,
        )
    }

    /// `take::begin` on a thread of its own (it blocks), from a successor with `cgroup`.
    fn begin(
        path: &Path,
        cgroup: &str,
    ) -> std::thread::JoinHandle<
        Result<Option<(take::Predecessor, super::super::Inventory)>, HandoverError>,
    > {
        let (path, me) = (path.to_path_buf(), agent(2, cgroup));
        std::thread::spawn(move || take::begin(&path, &me))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_successor_gets_the_inventory_and_takes_over_once_this_agent_released() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Pipe::default());
        let (mut server, path) = serving(dir.path(), &source);
        let (predecessor, mut inventory) = begin(&path, "/cg").join().unwrap().unwrap().unwrap();
        assert_eq!(predecessor.agent().pid, 1);
        let handed = inventory.take("listener/test").expect("the entry");
        assert_eq!((handed.info, handed.fds.len()), (json!({"n": 1}), 1));
        assert_eq!(source.frozen.load(Ordering::SeqCst), 1);

        let taking = std::thread::spawn(move || predecessor.take_over());
        let request = server.taken_over().await.expect("a take-over");
        assert_eq!(request.successor.pid, 2);
        request.released();
        let (outcome, _) = taking.join().unwrap().unwrap();
        assert_eq!(outcome, take::TakeOver::Released);
        assert_eq!(source.thawed.load(Ordering::SeqCst), 0, "frozen for good");
        server.stop();
    }

    /// Times the thread `tid` of this process was switched out so far.
    fn switches(tid: i32) -> u64 {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .unwrap()
            .lines()
            .filter_map(|line| {
                line.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .map(|count| count.trim().parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn an_idle_acceptor_sleeps_until_a_successor_comes_or_the_server_stops() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Pipe::default());
        let (server, path) = serving(dir.path(), &source);
        let started = Instant::now();
        let tid = loop {
            if let Some(tid) = server.shared.acceptor_tid.get() {
                break *tid;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no acceptor");
            std::thread::yield_now();
        };
        // Asleep in its wait once its state says so.
        while !std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .unwrap()
            .contains(") S ")
        {
            std::thread::yield_now();
        }
        let before = switches(tid);
        #[expect(
            clippy::disallowed_methods,
            reason = "a test's own thread, watching another sleep"
        )]
        std::thread::sleep(POLL * 6);
        assert_eq!(switches(tid) - before, 0, "the idle acceptor woke up");
        // A successor still gets an answer, and stopping ends the thread at once.
        assert!(matches!(
            begin(&path, "/other").join().unwrap(),
            Err(HandoverError::Refused { .. })
        ));
        let stopping = Instant::now();
        server.stop();
        assert!(stopping.elapsed() < POLL * 20, "{:?}", stopping.elapsed());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_that_runs_differently_or_comes_second_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Pipe::default());
        let (server, path) = serving(dir.path(), &source);
        let Err(HandoverError::Refused { pid: _, refusal }) =
            begin(&path, "/other").join().unwrap()
        else {
            panic!("a successor on another cgroup was not refused");
        };
        assert!(
            matches!(&refusal, Refusal::Mismatch(why) if why.contains("/other")),
            "{refusal:?}"
        );
        assert_eq!(
            source.frozen.load(Ordering::SeqCst),
            0,
            "nothing handed over"
        );

        let first = begin(&path, "/cg").join().unwrap().unwrap();
        let Err(HandoverError::Refused { refusal, .. }) = begin(&path, "/cg").join().unwrap()
        else {
            panic!("a second successor was not refused");
        };
        assert_eq!(refusal, Refusal::Busy);
        drop(first);
        server.stop();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_successor_that_gives_up_or_goes_away_leaves_this_agent_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Pipe::default());
        let (server, path) = serving(dir.path(), &source);
        let (predecessor, _) = begin(&path, "/cg").join().unwrap().unwrap().unwrap();
        predecessor.abort("not ready");
        let thawed = || source.thawed.load(Ordering::SeqCst);
        wait_until(|| thawed() == 1);
        // Gone without a word: the same.
        let (predecessor, _) = begin(&path, "/cg").join().unwrap().unwrap().unwrap();
        drop(predecessor);
        wait_until(|| thawed() == 2);
        // And the next one is served.
        assert!(begin(&path, "/cg").join().unwrap().unwrap().is_some());
        server.stop();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn once_shutting_down_successors_are_refused_and_one_whose_predecessor_died_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Pipe::default());
        let (server, path) = serving(dir.path(), &source);
        let (predecessor, _) = begin(&path, "/cg").join().unwrap().unwrap().unwrap();
        assert!(server.shutting_down(), "a successor holds the inventory");
        // This agent stops (or dies) before the take-over: the successor holds everything
        // already and carries on alone.
        server.stop();
        let (outcome, _) = predecessor.take_over().unwrap();
        assert_eq!(outcome, take::TakeOver::Gone);

        let source = Arc::new(Pipe::default());
        let (server, path) = serving(&dir.path().join("b"), &source);
        assert!(!server.shutting_down());
        let Err(HandoverError::Refused { refusal, .. }) = begin(&path, "/cg").join().unwrap()
        else {
            panic!("a successor of an agent shutting down was not refused");
        };
        assert_eq!(refusal, Refusal::ShuttingDown);
        server.stop();
    }

    fn wait_until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "not within 5 s");
            pause();
        }
    }
}
