//! The body of what the proxy sends upstream (responses to clients: `response`).
//!
//! An enum of the kinds it carries rather than a box around any body: a box was an allocation
//! a request. It stays small, as hyper moves a request whole several times: with it a request
//! fits in 256 bytes, past which every move takes `memcpy`'s slower path.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request the proxy sends upstream.
pub enum ProxyBody {
    /// Held whole (a buffered body: each try sends a clone); empty once sent, or from the start.
    Full(Bytes),
    /// Anything else: a body too large to buffer, streamed once.
    Boxed(BoxBody<Bytes, BoxError>),
}

impl ProxyBody {
    pub const EMPTY: ProxyBody = ProxyBody::Full(Bytes::new());

    pub fn boxed<B>(body: B) -> Self
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        ProxyBody::Boxed(BoxBody::new(body))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(take_whole(bytes)),
            ProxyBody::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_empty(),
            ProxyBody::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            ProxyBody::Boxed(body) => body.size_hint(),
        }
    }
}

/// A whole body's one frame, leaving it empty (ended).
pub(super) fn take_whole(bytes: &mut Bytes) -> Option<Result<Frame<Bytes>, BoxError>> {
    (!bytes.is_empty()).then(|| Ok(Frame::data(std::mem::take(bytes))))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_whole_body_is_one_frame_of_its_exact_size_and_an_empty_one_ends_at_once() {
        let body = ProxyBody::Full(Bytes::from_static(b"hello"));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");

        assert!(ProxyBody::EMPTY.is_end_stream());
        assert_eq!(ProxyBody::EMPTY.size_hint().exact(), Some(0));
    }

    #[test]
    fn a_request_fits_memcpys_fast_path() {
        assert_eq!(size_of::<ProxyBody>(), size_of::<Bytes>());
        assert!(size_of::<http::Request<ProxyBody>>() <= 256);
    }
}
