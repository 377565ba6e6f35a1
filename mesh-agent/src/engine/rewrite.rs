//! Request and response rewriting: `rewrite{uri, authority}` and `headers{request, response}`.
//!
//! Pure functions over `http` types. They only allocate when they change something (a new
//! path, a new header value), never to decide.

use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{HeaderMap, HeaderValue};

use super::routing::UriMatched;
use crate::config::model::{HeaderOperations, Rewrite};

/// Applies one level's header operations: `remove`, then `set` (replaces every value), then
/// `add` (appends), in that order, as Envoy evaluates them (remove-before-add).
pub(crate) fn apply_header_ops(ops: &HeaderOperations, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value) in &ops.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &ops.add {
        headers.append(name.clone(), value.clone());
    }
}

/// Applies `rewrite`: `uri` replaces the matched prefix when the route matched by prefix,
/// otherwise the whole path (Istio's semantics), or the whole path anyway with `whole_path`
/// (Gateway API's `ReplaceFullPath`, which may sit on a prefix match); the query string is
/// kept. `authority` replaces the `Host` header and the URI's authority if it has one.
pub(crate) fn apply_rewrite(rewrite: &Rewrite, matched: UriMatched, parts: &mut Parts) {
    let matched = if rewrite.whole_path {
        UriMatched::Whole
    } else {
        matched
    };
    let new_path = rewrite.uri.as_deref().map(|replacement| {
        let mut new = replaced_path(replacement, matched, parts.uri.path());
        if let Some(query) = parts.uri.query() {
            new.push('?');
            new.push_str(query);
        }
        new
    });
    let new_authority = rewrite.authority.as_deref();
    if new_path.is_none() && new_authority.is_none() {
        return;
    }
    let mut uri_parts = std::mem::take(&mut parts.uri).into_parts();
    if let Some(path) = new_path.and_then(|p| PathAndQuery::try_from(p).ok()) {
        uri_parts.path_and_query = Some(path);
    }
    if let Some(authority) = new_authority {
        if let Ok(value) = HeaderValue::from_str(authority) {
            parts.headers.insert(HOST, value);
        }
        if uri_parts.authority.is_some() {
            if let Ok(authority) = Authority::try_from(authority) {
                uri_parts.authority = Some(authority);
            }
        }
    }
    parts.uri = Uri::from_parts(uri_parts).unwrap_or_default();
}

/// `path` with the part `matched` covers replaced by `replacement`: the prefix the route
/// matched, or the whole path. Shared by rewrites and redirects, which Gateway API defines alike
/// (`ReplacePrefixMatch`).
pub(crate) fn replaced_path(replacement: &str, matched: UriMatched, path: &str) -> String {
    let rest = match matched {
        UriMatched::Prefix(len) => path.get(len..).unwrap_or(""),
        UriMatched::Whole => "",
    };
    let mut new = String::with_capacity(replacement.len() + rest.len() + 1);
    new.push_str(replacement);
    // `/api` → `/` must not produce `//x`; an empty result must still be a path.
    if new.ends_with('/') && rest.starts_with('/') {
        new.push_str(&rest[1..]);
    } else {
        new.push_str(rest);
    }
    if !new.starts_with('/') {
        new.insert(0, '/');
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, Request};

    fn parts(uri: &str) -> Parts {
        Request::get(uri)
            .header("host", "service-c")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn uri_rewrite_replaces_prefix_or_whole_path() {
        let cases = [
            (
                "/api/v1/users?x=1",
                UriMatched::Prefix(7),
                "/v2/",
                "/v2/users?x=1",
            ),
            ("/api/v1/users", UriMatched::Prefix(4), "/", "/v1/users"),
            ("/api", UriMatched::Prefix(4), "/", "/"),
            ("/old/exact?q", UriMatched::Whole, "/new", "/new?q"),
            ("/anything", UriMatched::Whole, "/fixed", "/fixed"),
        ];
        for (uri, matched, replacement, want) in cases {
            let mut p = parts(uri);
            let rewrite = Rewrite {
                uri: Some(replacement.into()),
                ..Rewrite::default()
            };
            apply_rewrite(&rewrite, matched, &mut p);
            assert_eq!(p.uri.to_string(), want, "{uri} with {replacement}");
        }
    }

    /// Gateway API's `ReplacePrefixMatch` table, with the model's trimming: a `PathPrefix` and
    /// a replacement are stored without a trailing `/`, and an empty replacement as `/`.
    #[test]
    fn prefix_rewrite_follows_gateway_api_replace_prefix_match() {
        let cases = [
            // (prefix as stored, replacement as stored, request, want)
            ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz", "/foo", "/xyz"),
            ("/foo", "/xyz", "/foo/", "/xyz/"),
            ("/foo", "/xyz", "/foo/bar?q=1", "/xyz/bar?q=1"),
            ("/foo", "/", "/foo/bar", "/bar"),
            ("/foo", "/", "/foo", "/"),
            ("/foo", "/", "/foo/", "/"),
            // Written `/foo/` and `/xyz/`.
            ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
            // Written `/`: every path, the replacement goes in front.
            ("", "/xyz", "/foo/bar", "/xyz/foo/bar"),
            ("", "/xyz", "/", "/xyz/"),
        ];
        for (prefix, replacement, uri, want) in cases {
            assert!(
                uri.strip_prefix(prefix)
                    .is_some_and(|r| r.is_empty() || r.starts_with(['/', '?'])),
                "{uri} must match {prefix}"
            );
            let mut p = parts(uri);
            let rewrite = Rewrite {
                uri: Some(replacement.into()),
                ..Rewrite::default()
            };
            apply_rewrite(&rewrite, UriMatched::Prefix(prefix.len()), &mut p);
            assert_eq!(p.uri.to_string(), want, "{prefix} → {replacement} on {uri}");
        }
    }

    #[test]
    fn whole_path_replaces_the_path_even_after_a_prefix_match() {
        let rewrite = Rewrite {
            uri: Some("/fixed".into()),
            whole_path: true,
            ..Rewrite::default()
        };
        let mut p = parts("/foo/bar?q=1");
        apply_rewrite(&rewrite, UriMatched::Prefix(4), &mut p);
        assert_eq!(p.uri, "/fixed?q=1");
        let mut p = parts("/foo/bar");
        apply_rewrite(&rewrite, UriMatched::Whole, &mut p);
        assert_eq!(p.uri, "/fixed");
    }

    #[test]
    fn authority_rewrite_sets_host_and_absolute_uri() {
        let rewrite = Rewrite {
            authority: Some("service-d:8080".into()),
            ..Rewrite::default()
        };
        let mut p = parts("/x");
        apply_rewrite(&rewrite, UriMatched::Whole, &mut p);
        assert_eq!(p.headers[HOST], "service-d:8080");
        assert_eq!(p.uri, "/x");
        let mut p = parts("http://service-c/x");
        apply_rewrite(&rewrite, UriMatched::Whole, &mut p);
        assert_eq!(p.uri, "http://service-d:8080/x");
    }

    #[test]
    fn header_ops_remove_then_set_then_add() {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        let value = |v: &'static str| HeaderValue::from_static(v);
        let mut headers = HeaderMap::new();
        headers.append("x-a", value("1"));
        headers.append("x-a", value("2"));
        headers.insert("x-gone", value("1"));
        let ops = HeaderOperations {
            set: vec![(name("x-a"), value("set")), (name("x-gone"), value("back"))],
            add: vec![(name("x-a"), value("added"))],
            remove: vec![name("x-gone")],
        };
        apply_header_ops(&ops, &mut headers);
        let a: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["set", "added"]);
        assert_eq!(headers["x-gone"], "back");
    }
}
