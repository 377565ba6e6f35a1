//! Routes the mesh answers itself, without an upstream: Gateway API's `RequestRedirect` filter
//! and the direct response of a rule whose backends are all invalid (500).
//!
//! The `Location` is decided here, from the request as the engine sees it, so the proxy only
//! writes the answer down (decide, then act).

use http::HeaderValue;

use super::registry::authority_host;
use super::request::RequestInfo;
use super::rewrite::replaced_path;
use super::routing::UriMatched;
use crate::config::model::{Redirect, RedirectPath};

/// A compiled route's local answer.
#[derive(Debug)]
pub(crate) enum LocalRule {
    Redirect(Redirect),
    Direct(u16),
}

/// How the mesh answers a request by itself: no upstream is asked, nothing is retried, and the
/// answer carries no response flag (Envoy logs a redirect and a direct response with none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalAnswer {
    /// `status` (301, 302, 303, 307 or 308) with this `Location`, and an empty body.
    Redirect { status: u16, location: HeaderValue },
    /// `status` with an empty body.
    Direct { status: u16 },
}

impl LocalAnswer {
    pub fn status(&self) -> u16 {
        match self {
            LocalAnswer::Redirect { status, .. } | LocalAnswer::Direct { status } => *status,
        }
    }

    /// The `Location` header of a redirect.
    pub fn location(&self) -> Option<&HeaderValue> {
        match self {
            LocalAnswer::Redirect { location, .. } => Some(location),
            LocalAnswer::Direct { .. } => None,
        }
    }
}

impl LocalRule {
    /// The answer to `req`, which matched the route as `matched` says.
    pub(crate) fn answer(&self, req: &RequestInfo<'_>, matched: UriMatched) -> LocalAnswer {
        match self {
            LocalRule::Direct(status) => LocalAnswer::Direct { status: *status },
            LocalRule::Redirect(redirect) => match location(redirect, req, matched) {
                Some(location) => LocalAnswer::Redirect {
                    status: redirect.status,
                    location,
                },
                // Validated config and a request hyper parsed always make a valid header; if
                // not, a redirect without a usable `Location` is no answer: 500, as Envoy
                // answers a route it cannot carry out.
                None => LocalAnswer::Direct { status: 500 },
            },
        }
    }
}

/// The request's URL with the redirect's parts replaced, per Gateway API's
/// `HTTPRequestRedirectFilter`: the scheme defaults to the request's; the host to the request's
/// without its port; the port, when not given, to the new scheme's default port if the scheme
/// is given, else to the port the request arrived on (the Service's port in the mesh, the
/// listener's at the ingress, as the Gateway API says); a scheme's default port is left out. The path is replaced whole or by its matched prefix, as `rewrite.uri` replaces it;
/// the query is kept.
fn location(
    redirect: &Redirect,
    req: &RequestInfo<'_>,
    matched: UriMatched,
) -> Option<HeaderValue> {
    let scheme = redirect.scheme.as_deref().unwrap_or(req.scheme);
    let host = redirect
        .host
        .as_deref()
        .unwrap_or_else(|| authority_host(req.authority));
    let port = match (redirect.port, &redirect.scheme) {
        (Some(port), _) => Some(port),
        (None, Some(scheme)) => default_port(scheme),
        (None, None) => Some(req.port),
    }
    .filter(|&port| default_port(scheme) != Some(port));
    let path = req.uri.path();
    let path = match &redirect.path {
        None => path.to_owned(),
        Some(RedirectPath::Whole(replacement)) => {
            replaced_path(replacement, UriMatched::Whole, path)
        }
        Some(RedirectPath::Prefix(replacement)) => replaced_path(replacement, matched, path),
    };
    let mut location = String::with_capacity(scheme.len() + host.len() + path.len() + 16);
    location.push_str(scheme);
    location.push_str("://");
    // An IPv6 literal (the request's, unbracketed by `authority_host`) needs its brackets back.
    if host.contains(':') && !host.starts_with('[') {
        location.push('[');
        location.push_str(host);
        location.push(']');
    } else {
        location.push_str(host);
    }
    if let Some(port) = port {
        location.push(':');
        location.push_str(&port.to_string());
    }
    location.push_str(&path);
    if let Some(query) = req.uri.query() {
        location.push('?');
        location.push_str(query);
    }
    HeaderValue::try_from(location).ok()
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method, Uri};

    use super::*;

    fn redirect(f: impl FnOnce(&mut Redirect)) -> LocalRule {
        let mut redirect = Redirect {
            scheme: None,
            host: None,
            port: None,
            path: None,
            status: 302,
        };
        f(&mut redirect);
        LocalRule::Redirect(redirect)
    }

    /// Asserts the `Location` `rule` answers each request URL with (scheme and authority as
    /// the engine sees them), the route having matched as `matched`.
    #[track_caller]
    fn check(rule: &LocalRule, matched: UriMatched, cases: &[(&str, &str)]) {
        for (url, want) in cases {
            let (scheme, rest) = url.split_once("://").unwrap();
            let (authority, path) = rest.split_at(rest.find('/').unwrap());
            let uri: Uri = path.parse().unwrap();
            let headers = HeaderMap::new();
            // The client reached the port its URL names.
            let port = authority
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse().ok())
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            let req = RequestInfo {
                method: &Method::GET,
                uri: &uri,
                authority,
                scheme,
                headers: &headers,
                port,
                gateway: None,
                namespace: "default",
                replayable: true,
            };
            let answer = rule.answer(&req, matched);
            assert_eq!(answer.status(), 302);
            assert_eq!(answer.location().unwrap(), want, "{rule:?} on {url}");
        }
    }

    #[test]
    fn location_replaces_the_given_parts_of_the_request_url() {
        let whole = UriMatched::Whole;
        // Nothing replaced: the request's URL, port and query included; a default port left out.
        check(
            &redirect(|_| {}),
            whole,
            &[
                ("http://a.example:8080/p?q=1", "http://a.example:8080/p?q=1"),
                ("http://a.example:80/p", "http://a.example/p"),
                ("http://a.example/p", "http://a.example/p"),
                ("https://a.example:443/p", "https://a.example/p"),
                // IPv6 literals keep their brackets.
                ("http://[fd00::1]:8080/p", "http://[fd00::1]:8080/p"),
            ],
        );
        // A new scheme takes its default port, left out: the request's port goes.
        check(
            &redirect(|r| r.scheme = Some("https".into())),
            whole,
            &[
                ("http://a.example:8080/p?q=1", "https://a.example/p?q=1"),
                ("http://a.example/", "https://a.example/"),
                ("http://[fd00::1]/p", "https://[fd00::1]/p"),
            ],
        );
        check(
            &redirect(|r| r.scheme = Some("http".into())),
            whole,
            &[("https://a.example:8443/p", "http://a.example/p")],
        );
        // An explicit port is kept, unless it is the scheme's default.
        check(
            &redirect(|r| r.port = Some(8080)),
            whole,
            &[
                ("http://a.example/p", "http://a.example:8080/p"),
                ("http://a.example:9090/p", "http://a.example:8080/p"),
            ],
        );
        let https_8443 = redirect(|r| {
            r.scheme = Some("https".into());
            r.port = Some(8443);
        });
        check(
            &https_8443,
            whole,
            &[("http://a.example:8080/p", "https://a.example:8443/p")],
        );
        check(
            &redirect(|r| r.port = Some(80)),
            whole,
            &[("http://a.example:8080/p", "http://a.example/p")],
        );
        // A new host keeps the request's port.
        check(
            &redirect(|r| r.host = Some("b.example".into())),
            whole,
            &[("http://a.example:8080/p", "http://b.example:8080/p")],
        );
        // Paths: whole, or the prefix the route matched (as `rewrite.uri`); the query stays.
        let prefix = UriMatched::Prefix(4);
        check(
            &redirect(|r| r.path = Some(RedirectPath::Whole("/new".into()))),
            prefix,
            &[("http://a.example/old/x?q=1", "http://a.example/new?q=1")],
        );
        check(
            &redirect(|r| r.path = Some(RedirectPath::Prefix("/xyz".into()))),
            prefix,
            &[
                (
                    "http://a.example/foo/bar?q=1",
                    "http://a.example/xyz/bar?q=1",
                ),
                ("http://a.example/foo", "http://a.example/xyz"),
            ],
        );
        check(
            &redirect(|r| r.path = Some(RedirectPath::Prefix("/".into()))),
            prefix,
            &[
                ("http://a.example/foo/bar", "http://a.example/bar"),
                ("http://a.example/foo", "http://a.example/"),
            ],
        );
    }

    #[test]
    fn a_direct_response_is_its_status_alone() {
        let answer = LocalRule::Direct(500).answer(
            &RequestInfo {
                method: &Method::GET,
                uri: &Uri::from_static("/"),
                authority: "a.example",
                scheme: "http",
                headers: &HeaderMap::new(),
                port: 80,
                gateway: None,
                namespace: "default",
                replayable: true,
            },
            UriMatched::Whole,
        );
        assert_eq!(answer, LocalAnswer::Direct { status: 500 });
        assert_eq!(answer.location(), None);
    }
}
