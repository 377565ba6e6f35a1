//! Hop-by-hop headers (RFC 9110 §7.6.1) stay on their own hop: removed from requests going
//! upstream and responses coming back.

use http::header::{self, HeaderMap, HeaderName};
use smallvec::SmallVec;

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection` and the fixed set.
/// `te: trailers` survives, since gRPC over HTTP/2 requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names, instead of hashing each of the nine.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let listed: SmallVec<[&str; 4]> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Only names present are removed (a removal hashes its name): usually `Connection` alone.
    let doomed: SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| {
            let fixed = is_hop_by_hop(name) && !(*name == header::TE && te_trailers);
            fixed || listed.iter().any(|l| l.eq_ignore_ascii_case(name.as_str()))
        })
        .cloned()
        .collect();
    drop(listed);
    for name in doomed {
        headers.remove(name);
    }
}

/// Whether `strip_hop_by_hop` has anything to look at (names listed in `Connection` are only
/// hop-by-hop when `Connection` is there).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

#[cfg(test)]
mod tests {
    use http::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_others_kept() {
        let mut map = headers(&[
            ("host", "service-c"),
            ("connection", "x-private, keep-alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut map);
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "x-kept"]);

        for alone in [
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "trailer",
        ] {
            let mut map = headers(&[("host", "a"), (alone, "x")]);
            strip_hop_by_hop(&mut map);
            assert_eq!(map.len(), 1, "{alone} must go");
        }
        let mut grpc = headers(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut grpc);
        assert_eq!(grpc.len(), 2, "te: trailers stays");
        let mut named_te = headers(&[("te", "trailers"), ("connection", "TE")]);
        strip_hop_by_hop(&mut named_te);
        assert!(
            named_te.is_empty(),
            "te named in Connection goes, trailers or not"
        );
        let mut closing = headers(&[("host", "a"), ("connection", "close"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut closing);
        let names: Vec<&str> = closing.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "accept"]);
        let mut plain = headers(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
    }
}
