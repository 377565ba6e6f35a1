//! Request-smuggling guard for downstream HTTP/1: hyper resolves a request that carries both
//! `Content-Length` and `Transfer-Encoding` by dropping the length, and forwards it. We refuse
//! such requests with 400 (as Envoy does), so this watches the raw bytes hyper reads, follows
//! HTTP/1 message framing, and records per request whether its head was ambiguous.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::limits::MAX_HEADER_BYTES;

/// Why a request head is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ambiguity {
    ContentLengthAndTransferEncoding,
    ConflictingContentLengths,
}

impl Ambiguity {
    pub fn reason(self) -> &'static str {
        match self {
            Ambiguity::ContentLengthAndTransferEncoding => {
                "request has both Content-Length and Transfer-Encoding"
            }
            Ambiguity::ConflictingContentLengths => {
                "request has conflicting Content-Length headers"
            }
        }
    }
}

/// The per-request verdicts, in request order, shared between the stream and the service.
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Option<Ambiguity>>>>);

impl Verdicts {
    /// The verdict for the next request the service sees (`None`: unambiguous or HTTP/2).
    pub fn next(&self) -> Option<Ambiguity> {
        self.0.lock().expect("verdicts lock").pop_front().flatten()
    }

    fn push(&self, verdict: Option<Ambiguity>) {
        self.0.lock().expect("verdicts lock").push_back(verdict);
    }
}

/// Where the framing tracker is in the byte stream.
enum Framing {
    /// Accumulating a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data plus its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailer,
    /// HTTP/2, a refused request (the connection closes after it), or framing we cannot follow:
    /// nothing more to check.
    Done,
}

pub struct Guarded<S> {
    inner: S,
    framing: Framing,
    /// The head or line being accumulated; reused, so a keep-alive connection allocates once.
    line: Vec<u8>,
    verdicts: Verdicts,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, verdicts: Verdicts) -> Self {
        Guarded {
            inner,
            framing: Framing::Head,
            line: Vec::new(),
            verdicts,
        }
    }

    fn track(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let line = &mut self.line;
            let (consumed, next) = match &mut self.framing {
                Framing::Done => return,
                Framing::Head => {
                    let (consumed, complete) = take_until(line, bytes, b"\r\n\r\n");
                    if line.starts_with(b"PRI * HTTP/2.0") {
                        self.framing = Framing::Done;
                        return;
                    }
                    if !complete {
                        if line.len() > MAX_HEADER_BYTES {
                            // hyper answers 431 and closes.
                            self.framing = Framing::Done;
                            return;
                        }
                        (consumed, None)
                    } else {
                        let (verdict, next) = judge(line);
                        self.verdicts.push(verdict);
                        (consumed, Some(next))
                    }
                }
                Framing::Body(left) => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    (take as usize, (*left == 0).then_some(Framing::Head))
                }
                Framing::ChunkData(left) => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    (take as usize, (*left == 0).then_some(Framing::ChunkSize))
                }
                Framing::ChunkSize => {
                    let (consumed, complete) = take_until(line, bytes, b"\r\n");
                    let next = complete.then(|| match chunk_size(line) {
                        Some(0) => Framing::Trailer,
                        Some(size) => Framing::ChunkData(size + 2),
                        None => Framing::Done,
                    });
                    (consumed, next)
                }
                Framing::Trailer => {
                    let (consumed, complete) = take_until(line, bytes, b"\r\n");
                    let next = complete.then_some(if line.len() == 2 {
                        Framing::Head
                    } else {
                        Framing::Trailer
                    });
                    (consumed, next)
                }
            };
            bytes = &bytes[consumed..];
            if let Some(next) = next {
                self.framing = next;
                self.line.clear();
            }
        }
    }
}

/// Appends bytes to `buf` up to and including `end`; returns (bytes consumed, found).
fn take_until(buf: &mut Vec<u8>, bytes: &[u8], end: &[u8]) -> (usize, bool) {
    // The terminator may straddle two reads: search from the last bytes already held.
    let held = buf.len();
    let from = held.saturating_sub(end.len() - 1);
    buf.extend_from_slice(bytes);
    match buf[from..].windows(end.len()).position(|w| w == end) {
        Some(at) => {
            let total = from + at + end.len();
            buf.truncate(total);
            (total - held, true)
        }
        None => (bytes.len(), false),
    }
}

/// The verdict on a complete head and how its body is framed.
fn judge(head: &[u8]) -> (Option<Ambiguity>, Framing) {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; 128];
    let mut request = httparse::Request::new(&mut []);
    if !matches!(
        request.parse_with_uninit_headers(head, &mut headers),
        Ok(httparse::Status::Complete(_))
    ) {
        // hyper rejects it with 400 and closes.
        return (None, Framing::Done);
    }
    let mut lengths = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value.trim_ascii());
    let length = lengths.next();
    let conflicting = lengths.any(|other| Some(other) != length);
    let chunked = request
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    if chunked && length.is_some() {
        return (
            Some(Ambiguity::ContentLengthAndTransferEncoding),
            Framing::Done,
        );
    }
    if conflicting {
        return (Some(Ambiguity::ConflictingContentLengths), Framing::Done);
    }
    if chunked {
        return (None, Framing::ChunkSize);
    }
    let length = length
        .and_then(|l| std::str::from_utf8(l).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let next = if length == 0 {
        Framing::Head
    } else {
        Framing::Body(length)
    };
    (None, next)
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let hex = line.split(|&b| b == b';').next()?.trim_ascii();
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) {
            let this = &mut *self;
            this.track(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes and returns the verdicts.
    fn verdicts(stream: &[u8], step: usize) -> Vec<Option<Ambiguity>> {
        let verdicts = Verdicts::default();
        let mut guarded = Guarded::new((), verdicts.clone());
        for piece in stream.chunks(step) {
            guarded.track(piece);
        }
        let queue = verdicts.0.lock().unwrap();
        queue.iter().copied().collect()
    }

    #[test]
    fn follows_framing_across_keep_alive_requests() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 3, 7, stream.len()] {
            assert_eq!(
                verdicts(stream, step),
                vec![
                    None,
                    None,
                    None,
                    Some(Ambiguity::ContentLengthAndTransferEncoding)
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn body_text_that_looks_like_headers_is_not_judged() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        stream.extend_from_slice(body);
        assert_eq!(verdicts(&stream, 4), vec![None]);
    }

    #[test]
    fn conflicting_lengths_and_http2() {
        let stream = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(
            verdicts(stream, 5),
            vec![Some(Ambiguity::ConflictingContentLengths)]
        );
        assert_eq!(verdicts(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 4), vec![]);
    }
}
