//! The HTTP/1 request checks hyper's parser does not make, in one place. hyper resolves a
//! request with both `Content-Length` and `Transfer-Encoding` by dropping the length before a
//! service sees it, accepts `Transfer-Encoding: gzip, chunked`, a missing or repeated `Host`,
//! a head up to its whole read buffer; Envoy answers all of those 400 (431 for a head over
//! 60 KiB or over 100 headers). So [`HeadChecker`] reads the raw bytes hyper reads, follows
//! HTTP/1 message framing exactly as hyper does (heads in CRLF or bare-LF form, split across
//! reads at any byte, pipelined; chunked bodies byte by byte with overflow-checked sizes) and
//! yields a verdict per request head, in order; [`Guarded`] feeds it from the connection and
//! [`Verdicts`] hands each verdict to the service that answers the request.
//!
//! Nothing else parses HTTP/1 beside hyper: the head is parsed by `httparse`, hyper's own
//! parser, with hyper's settings; only the rules above are added on top.

use std::{
    collections::VecDeque,
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{limits::MAX_HEADER_BYTES, H2_PREFACE};

/// The most header lines a request head may have (Envoy's `max_headers_count`, hyper's
/// default); more is answered 431.
pub const MAX_HEADERS: usize = 100;

/// Bytes of chunk extensions a body may carry in all (hyper's limit).
const MAX_CHUNK_EXTENSION_BYTES: u64 = 16 * 1024;

/// Heads up to this size keep their buffer for the next request on the connection; a larger
/// one gives it back, so an idle keep-alive connection holds little.
const KEPT_HEAD_CAPACITY: usize = 4 * 1024;

/// Why a request is refused. The connection closes after the answer: the bytes that follow
/// cannot be trusted to start a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The head is over [`MAX_HEADER_BYTES`] (431).
    HeadTooLarge,
    /// The head has over [`MAX_HEADERS`] header lines (431).
    TooManyHeaders,
    /// The head does not parse (hyper refuses it too).
    MalformedHead,
    /// Both `Content-Length` and `Transfer-Encoding`: which one frames the body is ambiguous.
    ContentLengthAndTransferEncoding,
    /// A `Content-Length` that is not a plain decimal number.
    InvalidContentLength,
    /// `Content-Length` lines with different values.
    ConflictingContentLengths,
    /// `Transfer-Encoding` other than one line saying `chunked` (or any on HTTP/1.0).
    UnsupportedTransferEncoding,
    /// HTTP/1.1 without `Host`.
    MissingHost,
    /// More than one `Host` line.
    DuplicateHost,
    /// A `Host` that is not a valid authority (`host[:port]`).
    InvalidHost,
    /// A request target that is neither origin form (`/path`), absolute form
    /// (`http://authority/path`), authority form for `CONNECT` nor `*` for `OPTIONS`.
    InvalidTarget,
    /// A chunked body whose framing is malformed (hyper fails it too).
    MalformedChunkedBody,
    /// The client closed the connection before the end of the body.
    IncompleteBody,
    /// A request the checker has no verdict for (it stopped following the framing).
    Unchecked,
}

impl Refusal {
    /// The status the request is answered with: 431 for a head too large, 400 otherwise.
    pub fn status(self) -> u16 {
        match self {
            Refusal::HeadTooLarge | Refusal::TooManyHeaders => 431,
            _ => 400,
        }
    }

    /// Why, for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::HeadTooLarge => "request head too large",
            Refusal::TooManyHeaders => "too many request headers",
            Refusal::MalformedHead => "malformed request head",
            Refusal::ContentLengthAndTransferEncoding => {
                "request has both Content-Length and Transfer-Encoding"
            }
            Refusal::InvalidContentLength => "invalid Content-Length",
            Refusal::ConflictingContentLengths => "request has conflicting Content-Length headers",
            Refusal::UnsupportedTransferEncoding => "unsupported Transfer-Encoding",
            Refusal::MissingHost => "HTTP/1.1 request without Host",
            Refusal::DuplicateHost => "request has more than one Host",
            Refusal::InvalidHost => "invalid Host",
            Refusal::InvalidTarget => "invalid request target",
            Refusal::MalformedChunkedBody => "malformed chunked body",
            Refusal::IncompleteBody => "request body cut short",
            Refusal::Unchecked => "request framing could not be followed",
        }
    }
}

/// What [`HeadChecker`] concludes, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// One request head: `Ok` when it passed every check. After an `Err` the checker stops.
    Head(Result<(), Refusal>),
    /// The body after the last head is malformed or cut short; the checker stops.
    Body(Refusal),
}

/// Where the checker is in the byte stream.
#[derive(Clone, Copy, Debug)]
enum State {
    /// The connection's first bytes, while they may still be the HTTP/2 preface.
    Preface,
    /// Accumulating a request head.
    Head,
    /// Skipping this many `Content-Length` body bytes.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// The connection is HTTP/2: nothing to check.
    Http2,
    /// A refusal was made: the connection closes after it.
    Stopped,
}

/// A chunked body, byte by byte, as hyper's decoder reads it.
#[derive(Clone, Copy, Debug)]
enum Chunk {
    /// Expecting the first hex digit of a chunk size.
    Start,
    /// Reading hex digits of a size.
    Size(u64),
    /// Spaces or tabs after the size.
    SizeSpace(u64),
    /// A chunk extension, up to CR.
    Extension(u64),
    /// Expecting the LF ending the size line.
    SizeLf(u64),
    /// Skipping chunk data.
    Data(u64),
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    EndCr,
    /// Expecting the final LF.
    EndLf,
    /// Inside a trailer line, up to CR.
    Trailer,
    /// Expecting the LF ending a trailer line.
    TrailerLf,
}

/// A pure, incremental checker of one downstream HTTP/1 byte stream: feed it the bytes as they
/// arrive, in pieces of any size, and it reports a [`Checked`] per request head (and when a
/// body is malformed), in order. It never panics and holds at most one head
/// ([`MAX_HEADER_BYTES`]) in memory.
///
/// ```
/// use mesh_agent::proxy::http::head_check::{Checked, HeadChecker, Refusal};
///
/// let mut checker = HeadChecker::new();
/// let mut seen = Vec::new();
/// for piece in [&b"GET / HTTP/1.1\r\nHo"[..], b"st: a\r\n\r\nPOST / HTTP/1.1\nHost: a\n"] {
///     checker.feed(piece, &mut |checked| seen.push(checked));
/// }
/// checker.feed(b"Content-Length: 1\nTransfer-Encoding: chunked\n\n", &mut |c| seen.push(c));
/// assert_eq!(
///     seen,
///     [
///         Checked::Head(Ok(())),
///         Checked::Head(Err(Refusal::ContentLengthAndTransferEncoding)),
///     ]
/// );
/// ```
#[derive(Debug)]
pub struct HeadChecker {
    state: State,
    /// The head being accumulated (at most `MAX_HEADER_BYTES + 1` bytes).
    head: Vec<u8>,
    /// Chunk-extension bytes of the current body, trailer bytes after its last chunk.
    counted: u64,
}

impl Default for HeadChecker {
    fn default() -> Self {
        Self::new()
    }
}

impl HeadChecker {
    pub fn new() -> Self {
        HeadChecker {
            state: State::Preface,
            head: Vec::new(),
            counted: 0,
        }
    }

    /// Whether the checker stopped: after a refusal, or on an HTTP/2 connection.
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, State::Stopped | State::Http2)
    }

    /// Whether the connection is HTTP/2 (its first bytes were the whole preface).
    pub fn is_http2(&self) -> bool {
        matches!(self.state, State::Http2)
    }

    /// Whether every byte read so far belongs to whole HTTP/1 requests: nothing of a head or
    /// body is pending.
    pub fn is_between_requests(&self) -> bool {
        matches!(self.state, State::Head) && self.head.is_empty()
    }

    /// Gives back the head buffer kept for the next request (while the connection sleeps).
    pub fn release_buffer(&mut self) {
        if self.head.is_empty() {
            self.head = Vec::new();
        }
    }

    /// Reads the next bytes of the stream; calls `emit` for each conclusion they complete.
    pub fn feed(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Checked)) {
        while !bytes.is_empty() {
            let consumed = match self.state {
                State::Stopped | State::Http2 => return,
                State::Preface => self.preface(bytes, emit),
                State::Head => self.head(bytes, emit),
                State::Body(left) => {
                    let take = left.min(bytes.len() as u64);
                    self.state = match left - take {
                        0 => State::Head,
                        left => State::Body(left),
                    };
                    take as usize
                }
                State::Chunked(Chunk::Data(left)) => {
                    let take = left.min(bytes.len() as u64);
                    self.state = State::Chunked(match left - take {
                        0 => Chunk::DataCr,
                        left => Chunk::Data(left),
                    });
                    take as usize
                }
                State::Chunked(chunk) => {
                    match self.chunk_byte(chunk, bytes[0]) {
                        Ok(state) => self.state = state,
                        Err(refusal) => self.stop(Checked::Body(refusal), emit),
                    }
                    1
                }
            };
            bytes = bytes.get(consumed..).unwrap_or_default();
        }
    }

    /// The stream ended: a body cut short is reported.
    pub fn end(&mut self, emit: &mut impl FnMut(Checked)) {
        if matches!(self.state, State::Body(_) | State::Chunked(_)) {
            self.stop(Checked::Body(Refusal::IncompleteBody), emit);
        }
    }

    fn stop(&mut self, checked: Checked, emit: &mut impl FnMut(Checked)) {
        self.state = State::Stopped;
        self.head = Vec::new();
        emit(checked);
    }

    /// The connection's first bytes: HTTP/2 if they are its preface, else the first head.
    fn preface(&mut self, bytes: &[u8], emit: &mut impl FnMut(Checked)) -> usize {
        let held = self.head.len();
        let take = (H2_PREFACE.len() - held).min(bytes.len());
        if bytes[..take] != H2_PREFACE[held..held + take] {
            // HTTP/1 after all: what was held is the start of the first head, and these bytes
            // are read again as its next ones.
            let held = std::mem::take(&mut self.head);
            self.state = State::Head;
            self.feed(&held, emit);
            return 0;
        }
        self.head.extend_from_slice(&bytes[..take]);
        if self.head.len() == H2_PREFACE.len() {
            self.state = State::Http2;
            self.head = Vec::new();
        }
        take
    }

    /// Accumulates a head and judges it once it may be complete; returns how many of `bytes`
    /// belong to it. A head that comes whole in one read (the usual case) is judged where it
    /// lies, without a copy.
    fn head(&mut self, bytes: &[u8], emit: &mut impl FnMut(Checked)) -> usize {
        let start = self.head.len();
        let take = (MAX_HEADER_BYTES + 1 - start.min(MAX_HEADER_BYTES)).min(bytes.len());
        let judged = if start == 0 {
            judge_to_last_line_feed(&bytes[..take], 0)
        } else {
            self.head.extend_from_slice(&bytes[..take]);
            judge_to_last_line_feed(&self.head, start)
        };
        match judged {
            // The head ended inside these bytes: the rest is body or the next request.
            Some((Ok(next), len)) => {
                emit(Checked::Head(Ok(())));
                self.state = next;
                self.counted = 0;
                if self.head.capacity() > KEPT_HEAD_CAPACITY {
                    self.head = Vec::new();
                } else {
                    self.head.clear();
                }
                len.saturating_sub(start)
            }
            Some((Err(refusal), len)) => {
                self.stop(Checked::Head(Err(refusal)), emit);
                len.saturating_sub(start)
            }
            None => {
                if start == 0 {
                    self.head.extend_from_slice(&bytes[..take]);
                }
                if self.head.len() > MAX_HEADER_BYTES {
                    self.stop(Checked::Head(Err(Refusal::HeadTooLarge)), emit);
                }
                take
            }
        }
    }

    /// One byte of chunked framing, with hyper's grammar and limits.
    fn chunk_byte(&mut self, chunk: Chunk, byte: u8) -> Result<State, Refusal> {
        let malformed = Refusal::MalformedChunkedBody;
        let next = match (chunk, byte) {
            (Chunk::Start, _) => Chunk::Size(hex_digit(0, byte).ok_or(malformed)?),
            (Chunk::Size(size), b'\t' | b' ') => Chunk::SizeSpace(size),
            (Chunk::Size(size) | Chunk::SizeSpace(size), b';') => Chunk::Extension(size),
            (Chunk::Size(size) | Chunk::SizeSpace(size) | Chunk::Extension(size), b'\r') => {
                Chunk::SizeLf(size)
            }
            (Chunk::Size(size), _) => Chunk::Size(hex_digit(size, byte).ok_or(malformed)?),
            (Chunk::SizeSpace(size), b'\t' | b' ') => Chunk::SizeSpace(size),
            (Chunk::Extension(_), b'\n') => return Err(malformed),
            (Chunk::Extension(size), _) => {
                self.counted += 1;
                if self.counted >= MAX_CHUNK_EXTENSION_BYTES {
                    return Err(malformed);
                }
                Chunk::Extension(size)
            }
            (Chunk::SizeLf(0), b'\n') => {
                self.counted = 0;
                Chunk::EndCr
            }
            (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Start,
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::EndLf, b'\n') => return Ok(State::Head),
            (Chunk::EndCr | Chunk::Trailer, _) => {
                // Trailers are bounded as a head is.
                self.counted += 1;
                if self.counted > MAX_HEADER_BYTES as u64 {
                    return Err(malformed);
                }
                match byte {
                    b'\r' => Chunk::TrailerLf,
                    _ => Chunk::Trailer,
                }
            }
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (
                Chunk::SizeSpace(_)
                | Chunk::SizeLf(_)
                | Chunk::DataCr
                | Chunk::DataLf
                | Chunk::EndLf
                | Chunk::TrailerLf,
                _,
            ) => return Err(malformed),
            // Data is skipped in bulk by `feed`.
            (Chunk::Data(_), _) => return Err(Refusal::Unchecked),
        };
        Ok(State::Chunked(next))
    }
}

/// `size * 16 + digit`, or `None` for a byte that is no hex digit or a size over `u64`.
fn hex_digit(size: u64, byte: u8) -> Option<u64> {
    let digit = char::from(byte).to_digit(16)?;
    size.checked_mul(16)?.checked_add(u64::from(digit))
}

/// [`judge`] on `head` up to its last line feed at or after `new` (where the bytes not looked
/// at yet start), or `None` if none arrived. A head can only end at a line feed: parsed again
/// only when one arrived, and only up to the last one, the verdict cannot depend on how the
/// client cut its writes (a bad byte after it is judged with the line it belongs to).
fn judge_to_last_line_feed(head: &[u8], new: usize) -> Option<(Result<State, Refusal>, usize)> {
    let last_line_feed = head.get(new..)?.iter().rposition(|&c| c == b'\n')?;
    judge(&head[..new + last_line_feed + 1])
}

/// The verdict on a head that may be complete, and its length: `None` while it is partial.
/// On success, the state that frames what follows it.
fn judge(head: &[u8]) -> Option<(Result<State, Refusal>, usize)> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => {
            return Some((Err(Refusal::TooManyHeaders), head.len()))
        }
        Err(_) => return Some((Err(Refusal::MalformedHead), head.len())),
    };
    if len > MAX_HEADER_BYTES {
        return Some((Err(Refusal::HeadTooLarge), len));
    }
    Some((rules(&request), len))
}

/// The rules on a parsed head hyper leaves out, as Envoy applies them.
fn rules(request: &httparse::Request<'_, '_>) -> Result<State, Refusal> {
    let http11 = request.version == Some(1);
    let method = request.method.unwrap_or_default();
    check_target(method, request.path.unwrap_or_default())?;

    let named = |name: &'static str| {
        request
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii())
    };
    let mut hosts = named("host");
    match (hosts.next(), hosts.next()) {
        (None, _) if http11 => return Err(Refusal::MissingHost),
        (None, _) => {}
        (Some(_), Some(_)) => return Err(Refusal::DuplicateHost),
        (Some(host), None) => check_host(host)?,
    }

    let mut encodings = named("transfer-encoding").peekable();
    let mut lengths = named("content-length").peekable();
    if encodings.peek().is_some() && lengths.peek().is_some() {
        return Err(Refusal::ContentLengthAndTransferEncoding);
    }
    if let Some(encoding) = encodings.next() {
        if !http11 || encodings.next().is_some() || !encoding.eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::UnsupportedTransferEncoding);
        }
        return Ok(State::Chunked(Chunk::Start));
    }
    let mut length = None;
    for value in lengths {
        let value = decimal(value).ok_or(Refusal::InvalidContentLength)?;
        if length.is_some_and(|length| length != value) {
            return Err(Refusal::ConflictingContentLengths);
        }
        length = Some(value);
    }
    Ok(match length {
        None | Some(0) => State::Head,
        Some(length) => State::Body(length),
    })
}

/// Origin form for every method; absolute form; authority form only for `CONNECT`; `*` only
/// for `OPTIONS` (RFC 9112 §3.2).
fn check_target(method: &str, target: &str) -> Result<(), Refusal> {
    let scheme = |scheme: &str| {
        target
            .get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    };
    let valid = target.starts_with('/')
        || scheme("http://")
        || scheme("https://")
        || (method == "CONNECT" && http::uri::Authority::try_from(target).is_ok())
        || (method == "OPTIONS" && target == "*");
    if valid {
        Ok(())
    } else {
        Err(Refusal::InvalidTarget)
    }
}

/// A `Host` must be `host[:port]`: no user info, path or spaces.
fn check_host(host: &[u8]) -> Result<(), Refusal> {
    let valid = is_plain_host(host)
        || (!host.is_empty()
            && !host.contains(&b'@')
            && http::uri::Authority::try_from(host).is_ok_and(|a| !a.host().is_empty()));
    if valid {
        Ok(())
    } else {
        Err(Refusal::InvalidHost)
    }
}

/// The usual `Host`: a name or IPv4 address and an optional port (letters, digits, '-', '.',
/// then ':' and digits). Every such host is one `http`'s parser accepts; checked in place, as
/// the parser would copy it first (an allocation a request).
fn is_plain_host(host: &[u8]) -> bool {
    let (name, port) = match host.iter().position(|&b| b == b':') {
        Some(colon) => (&host[..colon], &host[colon + 1..]),
        None => (host, &[][..]),
    };
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.iter().all(u8::is_ascii_digit)
}

/// A `Content-Length` value: decimal digits only, within `u64`.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The checker's verdict on each request head of one connection, in order, shared between the
/// stream that feeds the checker and the service that answers the requests.
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<Shared>>);

#[derive(Default)]
struct Shared {
    heads: VecDeque<Result<(), Refusal>>,
    /// Set when the body after the last head was refused.
    body: Option<Refusal>,
}

impl Verdicts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict on the next HTTP/1 request hyper hands to the service (never call it for
    /// HTTP/2): its head's, or the refusal of its body when that was already read. A request
    /// the checker has no verdict for is refused: the checker and hyper read the same bytes,
    /// so that never happens unless the framing was lost.
    pub fn next(&self) -> Result<(), Refusal> {
        let mut shared = self.lock();
        match shared.heads.pop_front() {
            Some(Ok(())) if shared.heads.is_empty() => shared.body.map_or(Ok(()), Err),
            Some(verdict) => verdict,
            None => Err(shared.body.unwrap_or(Refusal::Unchecked)),
        }
    }

    /// Whether every head read so far has been handed to a request (none waits in hyper).
    pub fn all_taken(&self) -> bool {
        self.lock().heads.is_empty()
    }

    /// Why the body of the request being forwarded failed, when the downstream is to blame
    /// (malformed chunked framing, cut short).
    pub fn body_refusal(&self) -> Option<Refusal> {
        self.lock().body
    }

    fn record(&self, checked: Checked) {
        let mut shared = self.lock();
        match checked {
            Checked::Head(verdict) => shared.heads.push_back(verdict),
            Checked::Body(refusal) => shared.body = Some(refusal),
        }
    }
}

/// A downstream connection read through a [`HeadChecker`], whose conclusions go to
/// [`Verdicts`].
pub struct Guarded<S> {
    inner: S,
    checker: HeadChecker,
    verdicts: Verdicts,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, verdicts: Verdicts) -> Self {
        Guarded {
            inner,
            checker: HeadChecker::new(),
            verdicts,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn checker(&self) -> &HeadChecker {
        &self.checker
    }

    pub fn checker_mut(&mut self) -> &mut HeadChecker {
        &mut self.checker
    }

    pub fn verdicts(&self) -> &Verdicts {
        &self.verdicts
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && !self.checker.is_stopped() {
            let this = &mut *self;
            let verdicts = &this.verdicts;
            let mut record = |checked| verdicts.record(checked);
            let read = &buf.filled()[before..];
            if read.is_empty() && buf.remaining() > 0 {
                this.checker.end(&mut record);
            } else {
                this.checker.feed(read, &mut record);
            }
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

    /// Feeds `stream` in pieces of `step` bytes; every conclusion.
    fn check(stream: &[u8], step: usize) -> Vec<Checked> {
        let mut checker = HeadChecker::new();
        let mut seen = Vec::new();
        for piece in stream.chunks(step) {
            checker.feed(piece, &mut |c| seen.push(c));
        }
        seen
    }

    #[test]
    fn a_host_checked_in_place_is_judged_as_http_judges_it() {
        let by_http = |host: &[u8]| {
            !host.is_empty()
                && !host.contains(&b'@')
                && http::uri::Authority::try_from(host).is_ok_and(|a| !a.host().is_empty())
        };
        let hosts: [&[u8]; 20] = [
            b"a",
            b"a:",
            b"a:80",
            b"hello.default.svc:8080",
            b"10.0.0.1",
            b"1.2.3.4:65535",
            b"A-b.C",
            b"[::1]:80",
            b"a b",
            b"a@b",
            b"",
            b":80",
            b"a:b",
            b"a:80:90",
            "\u{e9}".as_bytes(),
            b"a/b",
            b"a%20",
            b"-",
            b".",
            b"a:99999",
        ];
        for host in hosts {
            if is_plain_host(host) {
                assert!(by_http(host), "{:?}", String::from_utf8_lossy(host));
            }
            assert_eq!(
                check_host(host).is_ok(),
                by_http(host),
                "{:?}",
                String::from_utf8_lossy(host)
            );
        }
    }

    /// The conclusions on `stream` whatever its split into two reads, and in 1-byte reads.
    fn check_all_splits(stream: &[u8]) -> Vec<Checked> {
        let whole = check(stream, stream.len().max(1));
        assert_eq!(check(stream, 1), whole, "byte by byte");
        for at in 0..=stream.len() {
            let mut checker = HeadChecker::new();
            let mut seen = Vec::new();
            checker.feed(&stream[..at], &mut |c| seen.push(c));
            checker.feed(&stream[at..], &mut |c| seen.push(c));
            assert_eq!(seen, whole, "split at {at}");
        }
        whole
    }

    const PASS: Checked = Checked::Head(Ok(()));

    fn refused(refusal: Refusal) -> Checked {
        Checked::Head(Err(refusal))
    }

    /// Found by `cargo xtask fuzz` (http_head_check): a bad byte after the last line feed of a
    /// read was judged when the read also held a line feed, and not when the cut fell before it.
    #[test]
    fn a_bad_byte_is_judged_with_its_line_however_the_reads_are_cut() {
        let stream = b"\r\n\r\nnH$00 peoH$0\0\0U\x9d\xccGkZ0 p";
        assert_eq!(check_all_splits(stream), []);
        assert_eq!(
            check_all_splits(b"\r\n\r\nnH$00 peoH$0\0\0U\n"),
            [refused(Refusal::MalformedHead)]
        );
    }

    #[test]
    fn follows_framing_across_keep_alive_requests_in_any_line_ending() {
        let crlf = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let expected = [
            PASS,
            PASS,
            PASS,
            refused(Refusal::ContentLengthAndTransferEncoding),
        ];
        assert_eq!(check_all_splits(crlf), expected);
        // Bare LF heads (hyper accepts them); chunk lines keep CRLF, as hyper requires.
        let lf = b"POST /a HTTP/1.1\nHost: x\nContent-Length: 5\n\nhello\
GET /b HTTP/1.1\nHost: x\r\n\n\
\r\nPOST /c HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n5\r\nhello\r\n0\r\n\r\n\
POST /d HTTP/1.1\nHost: x\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\r\n\r\n";
        assert_eq!(check_all_splits(lf), expected);
    }

    #[test]
    fn body_text_that_looks_like_a_head_is_not_judged() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        assert_eq!(check_all_splits(&stream), [PASS]);
    }

    #[test]
    fn chunk_sizes_are_overflow_checked() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body = |size: &str| [&head[..], size.as_bytes(), b"\r\nhello"].concat();
        // The largest size there is: a valid (if endless) chunk.
        assert_eq!(check_all_splits(&body("FFFFFFFFFFFFFFFF")), [PASS]);
        for size in [
            "10000000000000000",
            "1FFFFFFFFFFFFFFFF",
            "zz",
            "-5",
            "0x5",
            "",
        ] {
            assert_eq!(
                check_all_splits(&body(size)),
                [PASS, Checked::Body(Refusal::MalformedChunkedBody)],
                "size {size:?}"
            );
        }
        let mut checker = HeadChecker::new();
        let mut seen = Vec::new();
        checker.feed(&body("5"), &mut |c| seen.push(c));
        checker.end(&mut |c| seen.push(c));
        assert_eq!(seen, [PASS, Checked::Body(Refusal::IncompleteBody)]);
    }

    #[test]
    fn heads_envoy_refuses() {
        let cases: &[(&str, Refusal)] = &[
            ("GET / HTTP/1.1\r\n\r\n", Refusal::MissingHost),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", Refusal::DuplicateHost),
            ("GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", Refusal::InvalidHost),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", Refusal::InvalidHost),
            ("GET / HTTP/1.1\r\nHost:\r\n\r\n", Refusal::InvalidHost),
            ("GET a HTTP/1.1\r\nHost: a\r\n\r\n", Refusal::InvalidTarget),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", Refusal::InvalidTarget),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Refusal::UnsupportedTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::UnsupportedTransferEncoding,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::UnsupportedTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
                Refusal::InvalidContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
                Refusal::InvalidContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Refusal::InvalidContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                Refusal::ConflictingContentLengths,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", Refusal::MalformedHead),
        ];
        for (head, refusal) in cases {
            assert_eq!(
                check_all_splits(head.as_bytes()),
                [refused(*refusal)],
                "{head:?}"
            );
            assert_eq!(refusal.status(), 400);
        }
        // HTTP/1.0 may leave out Host; the same Content-Length twice is one length.
        let fine = "GET / HTTP/1.0\r\n\r\nPOST / HTTP/1.1\r\nHost: a:80\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nxOPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(check_all_splits(fine.as_bytes()), [PASS, PASS, PASS]);
    }

    #[test]
    fn heads_too_large_or_with_too_many_headers_get_431() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(61 * 1024)
        );
        assert_eq!(
            check(big.as_bytes(), 1000),
            [refused(Refusal::HeadTooLarge)]
        );
        // Never ending: refused as soon as it passes the limit.
        let endless = "a".repeat(MAX_HEADER_BYTES + 1);
        assert_eq!(
            check(endless.as_bytes(), 4096),
            [refused(Refusal::HeadTooLarge)]
        );
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(
            check(head.as_bytes(), 100),
            [refused(Refusal::TooManyHeaders)]
        );
        assert_eq!(Refusal::TooManyHeaders.status(), 431);
    }

    #[test]
    fn http2_is_left_alone_and_a_near_preface_is_http1() {
        assert_eq!(
            check_all_splits(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0"),
            []
        );
        assert_eq!(
            check_all_splits(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            [refused(Refusal::MalformedHead)]
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_memory_stays_bounded() {
        let mut rng = fastrand::Rng::with_seed(16);
        let alphabet = b"\r\n :;0123456789abcdefxzGETPOSTHTTP/1.1HostContent-LengthTransfer-Encodingchunked\t\0\xff";
        for _ in 0..2000 {
            let len = rng.usize(0..400);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let mut checker = HeadChecker::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let (piece, next) = rest.split_at(rng.usize(1..=rest.len()));
                checker.feed(piece, &mut |_| {});
                rest = next;
            }
            checker.end(&mut |_| {});
            assert!(checker.head.len() <= MAX_HEADER_BYTES + 1);
        }
    }
}
