//! Trace context propagation, as Envoy does it for Istio: read the caller's context from B3
//! (`x-b3-*` headers or the single `b3` header) or W3C `traceparent`, make this hop's span a
//! child of the caller's span, and write the new context to the upstream request in B3 and W3C
//! form both, so the upstream continues the same trace whichever format it reads.
//!
//! Malformed context never fails a request: it is ignored, and a new trace starts.

use std::{cell::RefCell, ops::Range};

use bytes::{Bytes, BytesMut};
use http::{header::HeaderName, HeaderMap, HeaderValue};

const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const B3: HeaderName = HeaderName::from_static("b3");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Envoy's request id, kept end to end; Istio's access logs and spans carry it.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `x-request-id` passed on as is; a longer one is replaced (it ends up in every log
/// line and span of the request).
const MAX_REQUEST_ID: usize = 256;

/// This hop's span and how it relates to the caller's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    /// Never zero. A 64-bit B3 trace id is stored in the low 64 bits.
    pub trace_id: u128,
    /// Whether the trace id is written in 32 hex digits in B3. A caller that sent 16 gets 16
    /// back, so its own tools match the id; W3C and OTLP always use 128 bits (zero-padded).
    pub trace_id_128: bool,
    /// This hop's span: the upstream sees it as its parent.
    pub span_id: u64,
    /// The caller's span, `None` when this hop started the trace.
    pub parent_span_id: Option<u64>,
    /// Whether spans of this trace are recorded (exported). Unsampled traces still propagate.
    pub sampled: bool,
    /// B3 debug (`x-b3-flags: 1`): sampled, and downstream must keep it.
    pub debug: bool,
    /// `x-request-id`: the caller's, or a new UUID v4.
    pub request_id: RequestId,
    /// W3C `tracestate`, passed on when the context came with a valid `traceparent` of the same
    /// trace.
    pub tracestate: Option<HeaderValue>,
}

impl SpanContext {
    /// The trace id as 32 lowercase hex digits (the form Jaeger and W3C show).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// An `x-request-id`, held without an allocation. Visible ASCII either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestId {
    /// The caller's, checked when read ([`request_id`]), sharing the request's bytes.
    Carried(HeaderValue),
    /// A new UUID v4 ([`uuid_v4`]).
    Generated([u8; 36]),
}

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Carried(value) => value.as_bytes(),
            RequestId::Generated(uuid) => uuid,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

/// A sampling decision carried by the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sampling {
    Accept,
    Deny,
    Debug,
    /// No decision: this hop makes it.
    Defer,
}

/// The caller's context, as read from one header format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Incoming {
    trace_id: u128,
    trace_id_128: bool,
    span_id: u64,
    sampling: Sampling,
}

/// The context of the span this hop makes for a request with `headers`: a child of the caller's
/// span if the headers carry one (B3 multi-header first, then `b3`, then `traceparent`: B3 is
/// what Istio propagates), otherwise the root of a new trace. A new sampling decision (when the
/// caller made none) samples with probability `sample_ratio` (0.0 to 1.0).
pub fn continue_or_start(
    headers: &HeaderMap,
    sample_ratio: f64,
    rng: &mut fastrand::Rng,
) -> SpanContext {
    // Requests from apps that do not trace carry none of these headers: one pass over the
    // names then stands for the lookups below.
    let carried = carries_context(headers);
    let w3c = carried.then(|| traceparent(headers)).flatten();
    let incoming = carried
        .then(|| b3_multi(headers).or_else(|| b3_single(headers)))
        .flatten()
        .or(w3c);
    let sampling = match incoming {
        Some(incoming) => incoming.sampling,
        // B3 allows a sampling decision without ids ("b3: 0"): honour it for the new trace.
        None if carried => b3_sampling_only(headers),
        None => Sampling::Defer,
    };
    let (sampled, debug) = match sampling {
        Sampling::Accept => (true, false),
        Sampling::Deny => (false, false),
        Sampling::Debug => (true, true),
        Sampling::Defer => (rng.f64() < sample_ratio, false),
    };
    let tracestate = match (incoming, w3c) {
        (Some(incoming), Some(w3c)) if incoming.trace_id == w3c.trace_id => {
            headers.get(TRACESTATE).cloned()
        }
        _ => None,
    };
    SpanContext {
        trace_id: incoming.map_or_else(|| non_zero_u128(rng), |i| i.trace_id),
        trace_id_128: incoming.is_none_or(|i| i.trace_id_128),
        span_id: non_zero_u64(rng),
        parent_span_id: incoming.map(|i| i.span_id),
        sampled,
        debug,
        request_id: carried
            .then(|| request_id(headers))
            .flatten()
            .unwrap_or_else(|| uuid_v4(rng)),
        tracestate,
    }
}

/// Writes `context` to an upstream request: `x-b3-*`, `b3`, `traceparent` (and `tracestate`),
/// and `x-request-id`, replacing whatever the caller sent in those headers.
pub fn inject(context: &SpanContext, headers: &mut HeaderMap) {
    // Every value is written into one buffer and the headers share it (`share`): no
    // allocation per request, where a `HeaderValue` of each value would take one each.
    // The caller's id, when kept, is usually still there, alone; otherwise it goes in the
    // buffer too.
    let carried = carries_context(headers);
    let request_id = context.request_id.as_bytes();
    let write_request_id = !carried || {
        let mut sent = headers
            .get_all(&X_REQUEST_ID)
            .iter()
            .map(HeaderValue::as_bytes);
        (sent.next(), sent.next()) != (Some(request_id), None)
    };
    let mut buf = InjectBuf::new();
    let request_id = write_request_id.then(|| buf.push(request_id));
    let trace_id = if context.trace_id_128 {
        buf.push_hex(context.trace_id, 32)
    } else {
        buf.push_hex(u128::from(context.trace_id as u64), 16)
    };
    let span_id = buf.push_hex(u128::from(context.span_id), 16);
    let parent = context
        .parent_span_id
        .map(|parent| buf.push_hex(u128::from(parent), 16));
    // b3: {traceid}-{spanid}-{sampling}[-{parentspanid}]
    let single_start = buf.len;
    buf.repeat(trace_id.clone());
    buf.push(b"-");
    buf.repeat(span_id.clone());
    buf.push(match (context.debug, context.sampled) {
        // B3: debug implies sampled, and the sampled header is then left out.
        (true, _) => b"-d",
        (false, true) => b"-1",
        (false, false) => b"-0",
    });
    if let Some(parent) = &parent {
        buf.push(b"-");
        buf.repeat(parent.clone());
    }
    let single = single_start..buf.len;
    // traceparent: 00-{32 hex trace id}-{span id}-{flags}
    let traceparent_start = buf.len;
    buf.push(b"00-");
    buf.push_hex(context.trace_id, 32);
    buf.push(b"-");
    buf.repeat(span_id.clone());
    buf.push(if context.sampled { b"-01" } else { b"-00" });
    let traceparent = traceparent_start..buf.len;
    let buf = share(buf.as_ref());
    // Not checked byte by byte again (~300 instructions a request): every byte in `buf` is a
    // hex digit, '-', or the request id's, which is visible ASCII (checked when read, or
    // generated). Debug builds check anyway.
    let value = |range: Range<usize>| {
        // SAFETY: the bytes are valid in a header value, as above; `HeaderValue` relies on
        // that for `to_str`, not for memory safety.
        unsafe { HeaderValue::from_maybe_shared_unchecked(buf.slice(range)) }
    };

    // Room for what is written, in one step: a connection's first request has a map sized
    // for the headers it came with (later ones reuse a larger one), and growing it one
    // insert at a time rehashed it three times.
    headers.reserve(INJECTED_HEADERS);
    // `insert` replaces every value of a name; only names not written are removed, and only
    // if the request carried any.
    if context.debug {
        if carried {
            headers.remove(X_B3_SAMPLED);
        }
        headers.insert(X_B3_FLAGS, HeaderValue::from_static("1"));
    } else {
        if carried {
            headers.remove(X_B3_FLAGS);
        }
        let sampled = if context.sampled { "1" } else { "0" };
        headers.insert(X_B3_SAMPLED, HeaderValue::from_static(sampled));
    }
    match parent {
        Some(parent) => {
            headers.insert(X_B3_PARENTSPANID, value(parent));
        }
        None if carried => {
            headers.remove(X_B3_PARENTSPANID);
        }
        None => {}
    }
    headers.insert(X_B3_TRACEID, value(trace_id));
    headers.insert(X_B3_SPANID, value(span_id));
    headers.insert(B3, value(single));
    headers.insert(TRACEPARENT, value(traceparent));
    match &context.tracestate {
        Some(tracestate) => {
            headers.insert(TRACESTATE, tracestate.clone());
        }
        None if carried => {
            headers.remove(TRACESTATE);
        }
        None => {}
    }
    if let Some(range) = request_id {
        headers.insert(X_REQUEST_ID, value(range));
    }
}

/// Headers [`inject`] writes at most: the sampling flag, parent, trace and span ids, `b3`,
/// `traceparent`, `tracestate` and `x-request-id`.
const INJECTED_HEADERS: usize = 8;

/// Bytes [`inject`] writes at most besides the request id: ids of 32 + 16 + 16, `b3` of 68,
/// `traceparent` of 55.
const INJECT_CAPACITY: usize = 192;

/// Room for the trace headers of about twenty requests in each thread's [`SHARED`] buffer.
const SHARED_CAPACITY: usize = 4096;

thread_local! {
    /// Where [`inject`] puts each request's header values, one request after the other, so
    /// that requests share an allocation: a full buffer is reused in place once its requests
    /// have ended (their headers dropped), and replaced while any of them is still out, which
    /// then holds it until it ends.
    static SHARED: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(SHARED_CAPACITY));
}

/// `bytes` in this thread's [`SHARED`] buffer.
fn share(bytes: &[u8]) -> Bytes {
    SHARED.with_borrow_mut(|shared| {
        shared.reserve(bytes.len());
        shared.extend_from_slice(bytes);
        shared.split().freeze()
    })
}

/// The bytes of every header [`inject`] writes, in place until they go into this thread's
/// buffer ([`share`]).
struct InjectBuf {
    bytes: [u8; INJECT_CAPACITY + MAX_REQUEST_ID],
    len: usize,
}

impl InjectBuf {
    fn new() -> Self {
        InjectBuf {
            bytes: [0; INJECT_CAPACITY + MAX_REQUEST_ID],
            len: 0,
        }
    }

    /// Appends `bytes`; their range.
    fn push(&mut self, bytes: &[u8]) -> Range<usize> {
        let range = self.len..self.len + bytes.len();
        self.bytes[range.clone()].copy_from_slice(bytes);
        self.len = range.end;
        range
    }

    /// Appends again what `range` holds.
    fn repeat(&mut self, range: Range<usize>) {
        let len = range.len();
        self.bytes.copy_within(range, self.len);
        self.len += len;
    }

    /// Appends the low `digits` (even, at most 32) hex digits of `value`, lowercase and
    /// zero-padded; their range.
    fn push_hex(&mut self, value: u128, digits: usize) -> Range<usize> {
        match u64::try_from(value) {
            Ok(small) if digits <= 16 => self.push(&hex16(small)[16 - digits..]),
            _ => self.push(&hex32(value)[32 - digits..]),
        }
    }
}

impl AsRef<[u8]> for InjectBuf {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `value` as 32 lowercase hex digits.
fn hex32(value: u128) -> [u8; 32] {
    let mut out = [0; 32];
    out[..16].copy_from_slice(&hex16((value >> 64) as u64));
    out[16..].copy_from_slice(&hex16(value as u64));
    out
}

/// `value` as 16 lowercase hex digits, all at once: each nibble is spread into a byte of its
/// own, then every byte becomes its digit by the same arithmetic (a table lookup per digit cost
/// a few hundred instructions a request).
fn hex16(value: u64) -> [u8; 16] {
    const fn every_byte(byte: u8) -> u128 {
        u128::from_ne_bytes([byte; 16])
    }
    let x = u128::from(value);
    // Halve the lanes until nibble k of `value` (least significant first) sits in byte k.
    let x = (x & 0xffff_ffff) | ((x & 0xffff_ffff_0000_0000) << 32);
    let x = (x & 0x0000_0000_0000_ffff_0000_0000_0000_ffff)
        | ((x & 0x0000_0000_ffff_0000_0000_0000_ffff_0000) << 16);
    let x = (x & 0x0000_00ff_0000_00ff_0000_00ff_0000_00ff)
        | ((x & 0x0000_ff00_0000_ff00_0000_ff00_0000_ff00) << 8);
    let x = (x & 0x000f_000f_000f_000f_000f_000f_000f_000f)
        | ((x & 0x00f0_00f0_00f0_00f0_00f0_00f0_00f0_00f0) << 4);
    // 1 in the bytes holding 10 to 15, which skip from after '9' to 'a' (39 further).
    let letters = ((x + every_byte(6)) & every_byte(0x10)) >> 4;
    (x + every_byte(b'0') + letters * 39).to_be_bytes()
}

/// Whether any header of the trace context (or `x-request-id`) is present: a comparison per
/// header name, no hashing.
fn carries_context(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        matches!(
            name.as_str(),
            "x-b3-traceid"
                | "x-b3-spanid"
                | "x-b3-parentspanid"
                | "x-b3-sampled"
                | "x-b3-flags"
                | "b3"
                | "traceparent"
                | "tracestate"
                | "x-request-id"
        )
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// `x-b3-traceid` + `x-b3-spanid` (+ `x-b3-sampled` / `x-b3-flags`).
fn b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let (trace_id, trace_id_128) = b3_trace_id(header(headers, &X_B3_TRACEID)?)?;
    let span_id = hex_u64(header(headers, &X_B3_SPANID)?, false)?;
    Some(Incoming {
        trace_id,
        trace_id_128,
        span_id,
        sampling: b3_multi_sampling(headers),
    })
}

fn b3_multi_sampling(headers: &HeaderMap) -> Sampling {
    if header(headers, &X_B3_FLAGS) == Some("1") {
        return Sampling::Debug;
    }
    match header(headers, &X_B3_SAMPLED) {
        Some("1" | "true") => Sampling::Accept,
        Some("0" | "false") => Sampling::Deny,
        _ => Sampling::Defer,
    }
}

/// `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`.
fn b3_single(headers: &HeaderMap) -> Option<Incoming> {
    let mut parts = header(headers, &B3)?.split('-');
    let (trace_id, trace_id_128) = b3_trace_id(parts.next()?)?;
    let span_id = hex_u64(parts.next()?, false)?;
    let sampling = match parts.next() {
        None => Sampling::Defer,
        Some(flag) => b3_single_sampling(flag)?,
    };
    // The caller's parent is not ours to keep, but a malformed one makes the header invalid.
    if let Some(parent) = parts.next() {
        hex_u64(parent, false)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        trace_id,
        trace_id_128,
        span_id,
        sampling,
    })
}

fn b3_single_sampling(flag: &str) -> Option<Sampling> {
    match flag {
        "1" => Some(Sampling::Accept),
        "0" => Some(Sampling::Deny),
        "d" => Some(Sampling::Debug),
        _ => None,
    }
}

/// A sampling decision sent without ids: `b3: 0|1|d`, or `x-b3-sampled` / `x-b3-flags` alone.
fn b3_sampling_only(headers: &HeaderMap) -> Sampling {
    if let Some(sampling) = header(headers, &B3).and_then(b3_single_sampling) {
        return sampling;
    }
    b3_multi_sampling(headers)
}

/// `traceparent: {version}-{trace-id}-{parent-id}-{flags}`, lowercase hex as W3C requires.
fn traceparent(headers: &HeaderMap) -> Option<Incoming> {
    let value = header(headers, &TRACEPARENT)?;
    let mut parts = value.split('-');
    let version = hex_byte(parts.next()?)?;
    if version == 0xff {
        return None;
    }
    let trace_id = hex_u128(parts.next().filter(|t| t.len() == 32)?, true)?;
    let span_id = hex_u64(parts.next()?, true)?;
    let flags = hex_byte(parts.next()?)?;
    // Version 00 has exactly four fields; later versions may append more.
    if version == 0 && parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        trace_id,
        trace_id_128: true,
        span_id,
        sampling: if flags & 1 == 1 {
            Sampling::Accept
        } else {
            Sampling::Deny
        },
    })
}

/// A B3 trace id: 16 or 32 hex digits, not all zero.
fn b3_trace_id(s: &str) -> Option<(u128, bool)> {
    match s.len() {
        16 => hex_u64(s, false).map(|id| (u128::from(id), false)),
        32 => hex_u128(s, false).map(|id| (id, true)),
        _ => None,
    }
}

fn is_hex(s: &str, lowercase_only: bool) -> bool {
    s.bytes().all(|b| {
        b.is_ascii_digit()
            || (b'a'..=b'f').contains(&b)
            || (!lowercase_only && (b'A'..=b'F').contains(&b))
    })
}

/// Exactly 16 hex digits, not all zero (an all-zero id is invalid in B3 and W3C).
fn hex_u64(s: &str, lowercase_only: bool) -> Option<u64> {
    if s.len() != 16 || !is_hex(s, lowercase_only) {
        return None;
    }
    u64::from_str_radix(s, 16).ok().filter(|id| *id != 0)
}

/// Two lowercase hex digits (`traceparent`'s version and flags).
fn hex_byte(s: &str) -> Option<u8> {
    if s.len() != 2 || !is_hex(s, true) {
        return None;
    }
    u8::from_str_radix(s, 16).ok()
}

/// Exactly 32 hex digits, not all zero.
fn hex_u128(s: &str, lowercase_only: bool) -> Option<u128> {
    if s.len() != 32 || !is_hex(s, lowercase_only) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|id| *id != 0)
}

fn request_id(headers: &HeaderMap) -> Option<RequestId> {
    let id = headers.get(&X_REQUEST_ID)?;
    let bytes = id.as_bytes();
    let usable = !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID
        && bytes.iter().all(u8::is_ascii_graphic);
    usable.then(|| RequestId::Carried(id.clone()))
}

fn non_zero_u64(rng: &mut fastrand::Rng) -> u64 {
    rng.u64(1..)
}

fn non_zero_u128(rng: &mut fastrand::Rng) -> u128 {
    rng.u128(1..)
}

/// A random (version 4) UUID in its usual text form.
fn uuid_v4(rng: &mut fastrand::Rng) -> RequestId {
    let mut bits = rng.u128(..);
    // Version 4 (bits 76..80), variant 10 (bits 62..64).
    bits = (bits & !(0xf << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    let hex = hex32(bits);
    let mut text = [b'-'; 36];
    for (digits, at) in [
        (0..8, 0),
        (8..12, 9),
        (12..16, 14),
        (16..20, 19),
        (20..32, 24),
    ] {
        text[at..at + digits.len()].copy_from_slice(&hex[digits]);
    }
    RequestId::Generated(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_match_the_standard_formatting() {
        let mut rng = fastrand::Rng::with_seed(18);
        let edges = [
            0,
            1,
            9,
            10,
            15,
            16,
            u128::from(u64::MAX),
            u128::MAX,
            0x0123_4567_89ab_cdef,
        ];
        for value in edges.into_iter().chain((0..10_000).map(|_| rng.u128(..))) {
            assert_eq!(
                hex32(value),
                format!("{value:032x}").as_bytes(),
                "{value:#x}"
            );
            let low = value as u64;
            assert_eq!(hex16(low), format!("{low:016x}").as_bytes(), "{low:#x}");
            for digits in [16, 32] {
                let mut buf = InjectBuf::new();
                buf.push(b"x");
                let range = buf.push_hex(value, digits);
                let expected = format!("{value:032x}");
                assert_eq!(&buf.as_ref()[range], &expected.as_bytes()[32 - digits..]);
            }
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).expect("test header"),
            );
        }
        map
    }

    fn rng() -> fastrand::Rng {
        fastrand::Rng::with_seed(7)
    }

    fn continued(pairs: &[(&'static str, &str)]) -> SpanContext {
        continue_or_start(&headers(pairs), 0.0, &mut rng())
    }

    const TRACE_128: &str = "463ac35c9f6413ad48485a3953bb6124";
    const TRACE_64: &str = "48485a3953bb6124";
    const SPAN: &str = "a2fb4a1d1a96d312";

    #[test]
    fn b3_multi_header_is_continued() {
        let ctx = continued(&[
            ("x-b3-traceid", TRACE_128),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]);
        assert_eq!(ctx.trace_id_hex(), TRACE_128);
        assert!(ctx.trace_id_128);
        assert_eq!(ctx.parent_span_id, Some(0xa2fb4a1d1a96d312));
        assert_ne!(ctx.span_id, 0xa2fb4a1d1a96d312, "a new span for this hop");
        assert!(ctx.sampled && !ctx.debug);
    }

    #[test]
    fn b3_64_bit_trace_id_is_kept_64_bit() {
        let ctx = continued(&[
            ("x-b3-traceid", TRACE_64),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]);
        assert_eq!(ctx.trace_id, 0x48485a3953bb6124);
        assert!(!ctx.trace_id_128);
        assert!(!ctx.sampled);
        let mut out = HeaderMap::new();
        inject(&ctx, &mut out);
        assert_eq!(out["x-b3-traceid"], TRACE_64);
        assert_eq!(
            out["traceparent"],
            format!("00-0000000000000000{TRACE_64}-{}-00", ctx.span_id_hex()).as_str()
        );
    }

    #[test]
    fn b3_flags_mean_debug() {
        let ctx = continued(&[
            ("x-b3-traceid", TRACE_128),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        assert!(ctx.sampled && ctx.debug);
        let mut out = HeaderMap::new();
        inject(&ctx, &mut out);
        assert_eq!(out["x-b3-flags"], "1");
        assert!(!out.contains_key("x-b3-sampled"));
        assert!(out["b3"].to_str().expect("ascii").contains("-d-"));
    }

    #[test]
    fn b3_single_header_is_continued() {
        let value = format!("{TRACE_128}-{SPAN}-1-0020000000000001");
        let ctx = continued(&[("b3", &value)]);
        assert_eq!(ctx.trace_id_hex(), TRACE_128);
        assert_eq!(ctx.parent_span_id, Some(0xa2fb4a1d1a96d312));
        assert!(ctx.sampled);

        let deferred = continued(&[("b3", &format!("{TRACE_64}-{SPAN}"))]);
        assert_eq!(deferred.trace_id, 0x48485a3953bb6124);
        assert!(!deferred.sampled, "deferred, and our ratio is 0");

        let debug = continued(&[("b3", &format!("{TRACE_64}-{SPAN}-d"))]);
        assert!(debug.debug);
    }

    #[test]
    fn b3_sampling_alone_starts_a_trace_with_that_decision() {
        let sampled = continue_or_start(&headers(&[("b3", "1")]), 0.0, &mut rng());
        assert!(sampled.sampled);
        assert_eq!(sampled.parent_span_id, None);
        let denied = continue_or_start(&headers(&[("x-b3-sampled", "0")]), 1.0, &mut rng());
        assert!(!denied.sampled);
        assert_eq!(denied.parent_span_id, None);
    }

    #[test]
    fn traceparent_is_continued_with_its_tracestate() {
        let ctx = continued(&[
            ("traceparent", &format!("00-{TRACE_128}-{SPAN}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        assert_eq!(ctx.trace_id_hex(), TRACE_128);
        assert_eq!(ctx.parent_span_id, Some(0xa2fb4a1d1a96d312));
        assert!(ctx.sampled);
        assert_eq!(
            ctx.tracestate,
            Some(HeaderValue::from_static("congo=t61rcWkgMzE"))
        );
        let unsampled = continued(&[("traceparent", &format!("00-{TRACE_128}-{SPAN}-00"))]);
        assert!(!unsampled.sampled);
        // A later version may append fields.
        let future = continued(&[("traceparent", &format!("01-{TRACE_128}-{SPAN}-01-extra"))]);
        assert_eq!(future.parent_span_id, Some(0xa2fb4a1d1a96d312));
    }

    #[test]
    fn b3_wins_over_traceparent_and_drops_a_foreign_tracestate() {
        let ctx = continued(&[
            ("x-b3-traceid", TRACE_128),
            ("x-b3-spanid", SPAN),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        assert_eq!(ctx.trace_id_hex(), TRACE_128);
        assert_eq!(ctx.tracestate, None, "tracestate belongs to another trace");
    }

    #[test]
    fn malformed_context_starts_a_new_trace() {
        let long = "1".repeat(33);
        let cases: Vec<Vec<(&'static str, String)>> = vec![
            vec![
                ("x-b3-traceid", "zz8485a3953bb6124".into()),
                ("x-b3-spanid", SPAN.into()),
            ],
            vec![("x-b3-traceid", TRACE_128.into())],
            vec![
                ("x-b3-traceid", TRACE_128.into()),
                ("x-b3-spanid", "0000000000000000".into()),
            ],
            vec![
                ("x-b3-traceid", "00000000000000000000000000000000".into()),
                ("x-b3-spanid", SPAN.into()),
            ],
            vec![("x-b3-traceid", long), ("x-b3-spanid", SPAN.into())],
            vec![
                ("x-b3-traceid", "+8485a3953bb6124".into()),
                ("x-b3-spanid", SPAN.into()),
            ],
            vec![("b3", format!("{TRACE_128}-{SPAN}-x"))],
            vec![("b3", TRACE_128.to_owned())],
            vec![("b3", format!("{TRACE_128}-{SPAN}-1-zz-extra"))],
            vec![("traceparent", format!("ff-{TRACE_128}-{SPAN}-01"))],
            vec![(
                "traceparent",
                format!("00-{}-{SPAN}-01", TRACE_128.to_uppercase()),
            )],
            vec![("traceparent", format!("00-{TRACE_128}-{SPAN}-01-extra"))],
            vec![("traceparent", format!("00-{TRACE_128}-{SPAN}"))],
            vec![("traceparent", format!("00-{TRACE_64}-{SPAN}-01"))],
            vec![("traceparent", "garbage".into())],
        ];
        for case in cases {
            let pairs: Vec<(&'static str, &str)> =
                case.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let ctx = continued(&pairs);
            assert_eq!(ctx.parent_span_id, None, "{case:?} must start a new trace");
            assert!(ctx.trace_id_128 && ctx.trace_id != 0, "{case:?}");
            assert_ne!(
                ctx.trace_id_hex(),
                TRACE_128,
                "{case:?} must not reuse the id"
            );
        }
    }

    #[test]
    fn a_new_trace_is_sampled_by_ratio() {
        let mut rng = rng();
        let none = HeaderMap::new();
        let sampled = (0..10_000)
            .filter(|_| continue_or_start(&none, 0.25, &mut rng).sampled)
            .count();
        assert!((2_200..2_800).contains(&sampled), "{sampled}");
        assert!(continue_or_start(&none, 1.0, &mut rng).sampled);
        assert!(!continue_or_start(&none, 0.0, &mut rng).sampled);
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let kept = continued(&[("x-request-id", "abc-123")]);
        assert_eq!(kept.request_id.as_str(), "abc-123");
        let generated = continued(&[]);
        let id = generated.request_id.as_str();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        let too_long = "a".repeat(MAX_REQUEST_ID + 1);
        assert_ne!(
            continued(&[("x-request-id", &too_long)])
                .request_id
                .as_str(),
            too_long
        );
        assert_ne!(continued(&[("x-request-id", "")]).request_id.as_str(), "");
    }

    #[test]
    fn hex_is_lowercase_and_zero_padded() {
        let mut rng = rng();
        for value in [0, 1, u128::MAX, 0xa2fb4a1d1a96d312, rng.u128(..)] {
            let mut buf = InjectBuf::new();
            let range = buf.push_hex(value, 32);
            assert_eq!(&buf.as_ref()[range], format!("{value:032x}").as_bytes());
            let range = buf.push_hex(value, 16);
            assert_eq!(
                &buf.as_ref()[range],
                format!("{:016x}", value as u64).as_bytes()
            );
        }
    }

    #[test]
    fn every_context_header_counts_as_carried() {
        assert!(!carries_context(&headers(&[
            ("host", "a"),
            ("accept", "*/*")
        ])));
        for name in [
            X_B3_TRACEID,
            X_B3_SPANID,
            X_B3_PARENTSPANID,
            X_B3_SAMPLED,
            X_B3_FLAGS,
            B3,
            TRACEPARENT,
            TRACESTATE,
            X_REQUEST_ID,
        ] {
            let mut map = headers(&[("host", "a")]);
            map.insert(name.clone(), HeaderValue::from_static("1"));
            assert!(carries_context(&map), "{name}");
        }
    }

    #[test]
    fn injected_request_id_is_one_header() {
        let ctx = continued(&[("x-request-id", "abc-123")]);
        let mut upstream = headers(&[("x-request-id", "abc-123"), ("x-request-id", "other")]);
        inject(&ctx, &mut upstream);
        let ids: Vec<_> = upstream.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["abc-123"]);
    }

    #[test]
    fn injected_headers_continue_the_trace_at_the_upstream() {
        let mut rng = rng();
        let root = continue_or_start(&HeaderMap::new(), 1.0, &mut rng);
        let mut upstream = headers(&[
            ("x-b3-traceid", TRACE_128),
            ("x-b3-parentspanid", SPAN),
            ("tracestate", "stale=1"),
        ]);
        inject(&root, &mut upstream);
        assert_eq!(upstream["x-b3-traceid"], root.trace_id_hex().as_str());
        assert_eq!(upstream["x-b3-spanid"], root.span_id_hex().as_str());
        assert!(!upstream.contains_key("x-b3-parentspanid"), "root has none");
        assert!(!upstream.contains_key("tracestate"));
        assert_eq!(upstream["x-b3-sampled"], "1");
        assert_eq!(upstream["x-request-id"], root.request_id.as_str());

        // Every format the upstream might read yields the same parent.
        for only in ["x-b3-traceid", "b3", "traceparent"] {
            let mut subset = HeaderMap::new();
            for (name, value) in &upstream {
                let keep = match only {
                    "x-b3-traceid" => name.as_str().starts_with("x-b3-"),
                    other => name.as_str() == other,
                };
                if keep {
                    subset.insert(name.clone(), value.clone());
                }
            }
            let child = continue_or_start(&subset, 0.0, &mut rng);
            assert_eq!(child.trace_id, root.trace_id, "via {only}");
            assert_eq!(child.parent_span_id, Some(root.span_id), "via {only}");
            assert!(child.sampled, "via {only}");
        }

        let child = continue_or_start(&upstream, 0.0, &mut rng);
        let mut next = HeaderMap::new();
        inject(&child, &mut next);
        assert_eq!(
            next["x-b3-parentspanid"],
            format!("{:016x}", root.span_id).as_str()
        );
        assert_eq!(next["x-request-id"], root.request_id.as_str());
        assert_eq!(
            next["b3"],
            format!(
                "{}-{}-1-{:016x}",
                root.trace_id_hex(),
                child.span_id_hex(),
                root.span_id
            )
            .as_str()
        );
    }

    #[test]
    fn requests_keep_their_own_values_while_the_buffer_they_share_is_reused_and_replaced() {
        let mut rng = rng();
        let mut requests: Vec<(SpanContext, HeaderMap)> = Vec::new();
        // Enough requests to fill the buffer many times over, a few of them kept out (so
        // their buffer is replaced), the rest ended at once (so theirs is reused).
        for n in 0..2_000 {
            let context = continue_or_start(&HeaderMap::new(), 1.0, &mut rng);
            let mut upstream = HeaderMap::new();
            inject(&context, &mut upstream);
            if n % 97 == 0 {
                requests.push((context, upstream));
            }
        }
        for (context, upstream) in &requests {
            assert_eq!(upstream["x-b3-traceid"], context.trace_id_hex().as_str());
            assert_eq!(upstream["x-b3-spanid"], context.span_id_hex().as_str());
            assert_eq!(upstream["x-request-id"], context.request_id.as_str());
            let traceparent = format!("00-{}-{}-01", context.trace_id_hex(), context.span_id_hex());
            assert_eq!(upstream["traceparent"], traceparent.as_str());
        }
    }
}
