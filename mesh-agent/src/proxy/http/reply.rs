//! Responses the proxy makes itself, worded as Envoy words them.

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    Response, StatusCode,
};

use super::head_check::Refusal;
use crate::{
    engine::{EngineError, LocalAnswer},
    proxy::upstream::ReplyBody,
};

/// The answer to a request the engine refused or could not complete: its status, Envoy's text
/// and the response flags in `x-mesh-response-flags`.
pub fn engine_reply(error: &EngineError) -> Response<ReplyBody> {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = local_reply(status, reply_text(error));
    if let Ok(flags) = HeaderValue::from_str(&error.flags().to_string()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-mesh-response-flags"), flags);
    }
    response
}

/// The answer of a route that answers by itself (a redirect, a direct response): its status,
/// its `Location` if any, and an empty body, as Envoy sends them; no response-flags header,
/// since nothing failed.
pub fn local_answer_reply(answer: &LocalAnswer) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::EMPTY);
    *response.status_mut() =
        StatusCode::from_u16(answer.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(location) = answer.location() {
        response
            .headers_mut()
            .insert(header::LOCATION, location.clone());
    }
    response
}

/// Envoy's wording, so users' existing runbooks and searches still match.
fn reply_text(error: &EngineError) -> &'static str {
    match error {
        EngineError::NoRoute => "no route",
        EngineError::ClusterNotFound => "cluster not found",
        EngineError::NoHealthyUpstream => "no healthy upstream",
        EngineError::Overflow => {
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        }
        EngineError::PerTryTimeout | EngineError::RequestTimeout => "upstream request timeout",
        EngineError::FaultAbort { .. } => "fault filter abort",
        _ => "upstream connect error or disconnect/reset before headers",
    }
}

/// The answer to a request the head checker refused: 400 or 431 with the status's reason as
/// text, as Envoy answers a codec error, and `Connection: close` (what follows on the
/// connection cannot be trusted to start a request).
pub fn refusal_reply(refusal: Refusal) -> Response<ReplyBody> {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = local_reply(status, status.canonical_reason().unwrap_or_default());
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The answer when an HTTP/1.1 upstream's response is malformed or ambiguous (hyper could not
/// parse it, or `response_check::check` refused it): 502, as Envoy answers an upstream protocol
/// error, with the flags of the engine's verdict plus `UPE`.
pub fn protocol_error_reply(error: &EngineError) -> Response<ReplyBody> {
    let mut response = local_reply(
        StatusCode::BAD_GATEWAY,
        "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
    );
    if let Ok(flags) = HeaderValue::from_str(&format!("{},UPE", error.flags())) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-mesh-response-flags"), flags);
    }
    response
}

pub fn local_reply(status: StatusCode, text: &str) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::Full(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use hyper::body::Body;

    use super::*;

    #[test]
    fn a_local_answer_is_its_status_location_and_nothing_else() {
        let location = HeaderValue::from_static("https://a.example/p?q=1");
        let response = local_answer_reply(&LocalAnswer::Redirect {
            status: 301,
            location: location.clone(),
        });
        assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(response.headers()[header::LOCATION], location);
        assert_eq!(response.headers().len(), 1);
        assert!(response.body().is_end_stream());

        let response = local_answer_reply(&LocalAnswer::Direct { status: 500 });
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().is_empty());
        assert!(response.body().is_end_stream());
    }
}
