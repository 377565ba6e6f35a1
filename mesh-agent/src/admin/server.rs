//! Serving the admin API's listeners within limits: a pod neighbour that reaches the TCP
//! address can hold a few connections for a few seconds, and no more.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

/// What a listener may hold and for how long.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body read (`/apply`, `/delete`, `/pods`); larger ones get 413.
    pub max_body_bytes: usize,
    /// A request's head must arrive within this, counted from the connection's start or the end
    /// of the previous response; an idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// A connection is closed after this, whatever it is doing.
    pub connection_timeout: Duration,
    /// Connections open at once on one listener; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Connections open at once from one peer address (TCP only).
    pub max_connections_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_connections: 64,
            max_connections_per_peer: 8,
        }
    }
}

pub type Answer = Response<Full<Bytes>>;
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// Reads a whole request body of at most `limit` bytes; beyond it, the 413 to answer.
pub async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Answer> {
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body exceeds the admin API's limit of {limit} bytes\n"),
        )
    };
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => Err(text(StatusCode::BAD_REQUEST, &format!("{error}\n"))),
    }
}

pub fn text(status: StatusCode, body: &str) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

/// Serves `tcp` until the task is dropped.
pub async fn serve_tcp(listener: tokio::net::TcpListener, limits: Limits, handler: Handler) {
    let slots = Slots::new(&limits);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                accept_failed(&error).await;
                continue;
            }
        };
        let Some(slot) = slots.take(Some(peer.ip())) else {
            continue;
        };
        tokio::spawn(serve_connection(
            stream,
            limits.clone(),
            Arc::clone(&handler),
            slot,
        ));
    }
}

/// Serves `unix` until the task is dropped.
pub async fn serve_unix(listener: tokio::net::UnixListener, limits: Limits, handler: Handler) {
    let slots = Slots::new(&limits);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                accept_failed(&error).await;
                continue;
            }
        };
        let Some(slot) = slots.take(None) else {
            continue;
        };
        tokio::spawn(serve_connection(
            stream,
            limits.clone(),
            Arc::clone(&handler),
            slot,
        ));
    }
}

/// Out of descriptors (or another transient failure): wait instead of spinning on the error.
async fn accept_failed(error: &std::io::Error) {
    warn!(%error, "admin API: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_connection<S>(stream: S, limits: Limits, handler: Handler, _slot: Slot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let answer = handler(request);
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_timeout, connection).await {
        Ok(Ok(())) => {}
        // A client that went silent or away: its business, not the agent's.
        Ok(Err(error)) => debug!(%error, "admin connection ended"),
        Err(_) => debug!("admin connection closed after the connection timeout"),
    }
}

/// The connections a listener has open, in all and by peer.
#[derive(Clone)]
struct Slots {
    inner: Arc<Mutex<SlotsInner>>,
    max: usize,
    max_per_peer: usize,
}

struct SlotsInner {
    open: usize,
    by_peer: HashMap<IpAddr, usize>,
    /// When a refusal was last logged: at most one line a second, however many are refused.
    last_warned: Option<Instant>,
    refused_since_warned: u64,
}

/// One open connection; dropping it frees the slot.
struct Slot {
    slots: Slots,
    peer: Option<IpAddr>,
}

impl Slots {
    fn new(limits: &Limits) -> Slots {
        Slots {
            inner: Arc::new(Mutex::new(SlotsInner {
                open: 0,
                by_peer: HashMap::new(),
                last_warned: None,
                refused_since_warned: 0,
            })),
            max: limits.max_connections,
            max_per_peer: limits.max_connections_per_peer,
        }
    }

    fn take(&self, peer: Option<IpAddr>) -> Option<Slot> {
        let mut inner = self.inner.lock().expect("admin slots");
        let from_peer = peer.map_or(0, |ip| inner.by_peer.get(&ip).copied().unwrap_or(0));
        if inner.open >= self.max || from_peer >= self.max_per_peer {
            inner.refused_since_warned += 1;
            let now = Instant::now();
            if inner
                .last_warned
                .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
            {
                warn!(
                    refused = inner.refused_since_warned,
                    open = inner.open,
                    peer = ?peer,
                    "admin API: connection limit reached; refusing connections"
                );
                inner.last_warned = Some(now);
                inner.refused_since_warned = 0;
            }
            return None;
        }
        inner.open += 1;
        if let Some(ip) = peer {
            *inner.by_peer.entry(ip).or_default() += 1;
        }
        Some(Slot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().expect("admin slots");
        inner.open -= 1;
        if let Some(ip) = self.peer {
            if let Some(count) = inner.by_peer.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    inner.by_peer.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    /// Answers with the length of the body it read.
    fn body_length(limit: usize) -> Handler {
        Arc::new(move |request| {
            Box::pin(async move {
                match read_body(request, limit).await {
                    Ok(body) => text(StatusCode::OK, &body.len().to_string()),
                    Err(refusal) => refusal,
                }
            })
        })
    }

    async fn server(limits: Limits) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = limits.max_body_bytes;
        tokio::spawn(serve_tcp(listener, limits, body_length(limit)));
        addr
    }

    /// Sends `request` and reads until the server closes: (answer, how long that took).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, Duration) {
        let started = tokio::time::Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    }

    fn post(body_len: usize) -> Vec<u8> {
        let mut request = format!(
            "POST /apply HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\
             Content-Length: {body_len}\r\n\r\n"
        )
        .into_bytes();
        request.resize(request.len() + body_len, b'x');
        request
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413() {
        let limits = Limits {
            max_body_bytes: 1024,
            ..Limits::default()
        };
        let addr = server(limits).await;
        let (answer, _) = exchange(addr, &post(1024)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("1024"), "{answer}");
        let (answer, _) = exchange(addr, &post(1025)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        // Without a length given up front: counted as it arrives.
        let chunked = b"POST /apply HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\
            Transfer-Encoding: chunked\r\n\r\n400\r\n"
            .iter()
            .copied()
            .chain([b'x'; 1024])
            .chain(*b"\r\n1\r\nx\r\n0\r\n\r\n")
            .collect::<Vec<u8>>();
        let (answer, _) = exchange(addr, &chunked).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_ends_is_closed_after_the_header_read_timeout() {
        let addr = server(Limits::default()).await;
        let (answer, took) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: adm").await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(6),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_closed_after_the_connection_timeout() {
        let addr = server(Limits::default()).await;
        let head = b"POST /apply HTTP/1.1\r\nHost: admin\r\nContent-Length: 100\r\n\r\nxx";
        let (answer, took) = exchange(addr, head).await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            took >= Duration::from_secs(30) && took < Duration::from_secs(31),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn one_peer_cannot_take_every_connection() {
        let limits = Limits {
            max_connections: 4,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let addr = server(limits).await;
        // Two silent connections from 127.0.0.1 hold its share...
        let _held = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        // (accepted in order: the third is refused only once both are counted)
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (answer, _) = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(
            answer, "",
            "a third connection from the same peer is closed"
        );
        // ...while another peer address is still served.
        let other: SocketAddr = "127.0.0.2:0".parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(other).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(&post(3)).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
