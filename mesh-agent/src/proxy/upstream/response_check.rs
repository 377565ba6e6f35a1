//! The checks on an HTTP/1.1 response head that hyper's parser does not make, as Envoy makes
//! them: a response that fails one is an upstream protocol error (502, `UPE`).

use http::{header, Response};

use super::error::SendError;

/// The largest response head accepted, counted as Envoy counts it (names and values); larger
/// is an upstream protocol error (Envoy's `max_response_headers_kb` default).
const MAX_RESPONSE_HEADER_BYTES: usize = 60 * 1024;

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
