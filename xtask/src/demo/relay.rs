//! Relays from the host's loopback into the simulated node, so the tutorial's commands work
//! from any terminal: `curl localhost:8080/service-a` reaches the gateway in the node and
//! `curl localhost:15000/clusters` the agent's admin API there (reads only: `mesh-agent apply`
//! goes through the agent's admin socket, a file, which needs no relay).

use std::{
    collections::HashMap,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
};

use anyhow::{Context, Result};
use mesh_tests::tutorial::NodeDialer;

/// One host port relayed to one address inside the node. Dropping it stops accepting and
/// closes the connections in flight.
pub struct Relay {
    listen: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
}

impl Relay {
    /// Listens on `listen` (the host's namespace) and relays each connection to `target` inside
    /// the node. Fails if the host port is taken.
    pub fn start(listen: SocketAddr, target: SocketAddr, dialer: NodeDialer) -> Result<Relay> {
        let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        let relay = Relay {
            listen,
            stop: Arc::new(AtomicBool::new(false)),
            open: Arc::default(),
        };
        let (stop, open) = (Arc::clone(&relay.stop), Arc::clone(&relay.open));
        thread::Builder::new()
            .name(format!("relay {listen}"))
            .spawn(move || accept_loop(listener, target, dialer, stop, open))?;
        Ok(relay)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.listen);
        for (client, upstream) in self.open.lock().expect("open connections").values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    dialer: NodeDialer,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let (dialer, open) = (dialer.clone(), Arc::clone(&open));
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // Dialling enters the node's namespace on a thread of its own; never on this one,
        // which must keep accepting in the host's namespace.
        thread::spawn(move || {
            let Ok(upstream) = dialer.connect(target) else {
                // Closing the client tells it the target is not there (curl: "empty reply").
                return;
            };
            // Kept so that stopping the relay can close connections still in flight.
            if let (Ok(c), Ok(u)) = (client.try_clone(), upstream.try_clone()) {
                open.lock().expect("open connections").insert(id, (c, u));
            }
            pipe(client, upstream);
            open.lock().expect("open connections").remove(&id);
        });
    }
}

/// Copies bytes both ways until both directions reach EOF; each EOF is passed on as a
/// half-close, so request/response protocols finish normally.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    };
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let back = thread::spawn(move || copy(upstream2, client2));
    copy(client, upstream);
    let _ = back.join();
}
