//! An upstream response's body, holding its connection until the body is read to its end: an
//! HTTP/1.1 connection goes back to the pool then (or is closed if the body was not read
//! whole), an HTTP/2 stream stops counting toward its connection's idleness. And the body of
//! every response the proxy sends a client, the upstream's among them: an enum of the kinds
//! it carries, as a box around each was an allocation a request.

use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{
    body::{take_whole, BoxError},
    http1, http2,
};

/// What a response body holds of the pool.
pub(super) enum Lease {
    Http1(http1::Lease),
    Http2(http2::Lease),
}

impl From<http1::Lease> for Lease {
    fn from(lease: http1::Lease) -> Self {
        Lease::Http1(lease)
    }
}

impl From<http2::Lease> for Lease {
    fn from(lease: http2::Lease) -> Self {
        Lease::Http2(lease)
    }
}

/// The body of a response from the pool.
pub struct ResponseBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl ResponseBody {
    pub(super) fn new(inner: Incoming, lease: impl Into<Lease>) -> Self {
        let mut body = ResponseBody {
            inner,
            lease: Some(lease.into()),
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

/// The body of a response the proxy sends a client.
pub enum ReplyBody {
    /// The proxy's own, held whole; empty once sent, or from the start.
    Full(Bytes),
    /// An upstream's, holding its pooled connection until read.
    Upstream(ResponseBody),
    /// An app's, at the destination.
    Incoming(Incoming),
}

impl ReplyBody {
    pub const EMPTY: ReplyBody = ReplyBody::Full(Bytes::new());
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReplyBody::Full(bytes) => Poll::Ready(take_whole(bytes)),
            ReplyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ReplyBody::Incoming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplyBody::Full(bytes) => bytes.is_empty(),
            ReplyBody::Upstream(body) => body.is_end_stream(),
            ReplyBody::Incoming(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplyBody::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            ReplyBody::Upstream(body) => body.size_hint(),
            ReplyBody::Incoming(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn the_proxys_own_reply_is_one_frame_and_an_empty_one_ends_at_once() {
        let reply = ReplyBody::Full(Bytes::from_static(b"hello"));
        assert_eq!(reply.size_hint().exact(), Some(5));
        assert_eq!(reply.collect().await.unwrap().to_bytes(), "hello");

        assert!(ReplyBody::EMPTY.is_end_stream());
        let empty = ReplyBody::EMPTY.collect().await.unwrap().to_bytes();
        assert!(empty.is_empty());
    }
}
