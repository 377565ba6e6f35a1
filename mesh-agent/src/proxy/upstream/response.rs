//! An upstream response: the checks on an HTTP/1.1 head hyper's parser does not make, and its
//! body, holding its connection until the body is read to its end: an HTTP/1.1 connection
//! goes back to the pool then (or is closed if the body was not read whole), an HTTP/2 stream
//! stops counting toward its connection's idleness.

use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{header, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{body::BoxError, error::SendError, http1, http2};

/// The largest response head accepted, counted as Envoy counts it (names and values); larger
/// is an upstream protocol error (Envoy's `max_response_headers_kb` default).
pub const MAX_RESPONSE_HEADER_BYTES: usize = 60 * 1024;

/// Refuses an HTTP/1.1 response head hyper parsed but Envoy would not forward (502): both
/// `Content-Length` and `Transfer-Encoding` (hyper frames it by the encoding and would pass
/// the length on), `Transfer-Encoding` other than one `chunked`, or a head over
/// [`MAX_RESPONSE_HEADER_BYTES`]. hyper itself refuses conflicting or invalid lengths, over
/// 100 headers and malformed lines.
pub(super) fn check<B>(response: &Response<B>) -> Result<(), SendError> {
    let headers = response.headers();
    let mut encodings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(encoding) = encodings.next() {
        let chunked = encoding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !chunked || encodings.next().is_some() || headers.contains_key(header::CONTENT_LENGTH) {
            return Err(SendError::Protocol);
        }
    }
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if size > MAX_RESPONSE_HEADER_BYTES {
        return Err(SendError::Protocol);
    }
    Ok(())
}

/// What a response body holds of the pool.
pub(super) enum Lease {
    Http1(http1::Lease),
    Http2(http2::Lease),
}

/// The body of a response from the pool.
pub struct ResponseBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl ResponseBody {
    pub(super) fn new(inner: Incoming, lease: Lease) -> Self {
        let mut body = ResponseBody {
            inner,
            lease: Some(lease),
        };
        // No body at all (204, 304, a response to HEAD, `content-length: 0`): done already.
        if body.inner.is_end_stream() {
            body.release(true);
        }
        body
    }

    fn release(&mut self, complete: bool) {
        match self.lease.take() {
            Some(Lease::Http1(lease)) => lease.finish(complete),
            Some(Lease::Http2(lease)) => drop(lease),
            None => {}
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(true),
            Some(Err(_)) => this.release(false),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(true),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Read whole only if nothing is left; otherwise hyper closes an HTTP/1.1 connection.
        let complete = self.inner.is_end_stream();
        self.release(complete);
    }
}
