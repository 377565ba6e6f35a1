//! Route matching: virtual hosts by authority, then `VirtualService.spec.http[]` in order,
//! first match wins.

use foldhash::HashMap;

use http::HeaderMap;

use super::registry::{authority_host, resolve_host, HostBuf};
use super::request::RequestInfo;
use crate::config::model::{Exclusive, RequestMatch, StringMatch};

/// Routes grouped by the host they serve.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    hosts: HashMap<Box<str>, u32>,
    /// `*.suffix` hosts as `.suffix` (and `*` as the empty suffix), longest first.
    wildcards: Vec<(Box<str>, u32)>,
    pub(crate) vhosts: Vec<VirtualHost>,
    /// Some virtual host is claimed by Gateway API routes (saves the lookup when none is).
    pub(crate) any_exclusive: bool,
}

/// One host's routes in precedence order, and the default route when the host is a service.
#[derive(Debug, Default)]
pub(crate) struct VirtualHost {
    pub(crate) routes: Vec<u32>,
    pub(crate) default: Option<u32>,
    /// The ports on which a Gateway API route claims the host for mesh traffic: there an HTTP
    /// request none of `routes` matches is `NR` instead of taking `default` (which still
    /// carries opaque TCP).
    pub(crate) exclusive: Exclusive,
}

impl RouteTable {
    /// The virtual host for `fqdn`, created empty if new.
    pub(crate) fn vhost_mut(&mut self, fqdn: &str) -> &mut VirtualHost {
        let next = u32::try_from(self.vhosts.len()).expect("fewer than 2^32 hosts");
        let index = if let Some(suffix) = fqdn.strip_prefix('*') {
            match self.wildcards.iter().find(|(s, _)| **s == *suffix) {
                Some(&(_, i)) => i,
                None => {
                    self.wildcards.push((suffix.into(), next));
                    self.wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
                    next
                }
            }
        } else {
            *self.hosts.entry(fqdn.into()).or_insert(next)
        };
        if index == next {
            self.vhosts.push(VirtualHost::default());
        }
        &mut self.vhosts[index as usize]
    }

    /// The virtual host for a request authority seen from `namespace`: the resolved service
    /// name first, then the host as written (external names), then wildcard hosts (longest
    /// suffix first).
    pub(crate) fn lookup(&self, authority: &str, namespace: &str) -> Option<&VirtualHost> {
        let host = authority_host(authority);
        let mut buf = HostBuf::new();
        let index = resolve_host(host, namespace, &mut buf)
            .and_then(|fqdn| self.hosts.get(fqdn).copied())
            .or_else(|| {
                let literal = buf.set(host)?;
                self.hosts.get(literal).copied().or_else(|| {
                    self.wildcards
                        .iter()
                        .find(|(suffix, _)| literal.ends_with(&**suffix))
                        .map(|&(_, i)| i)
                })
            })?;
        self.vhosts.get(index as usize)
    }
}

/// A compiled `match` entry.
#[derive(Debug)]
pub(crate) struct Match {
    pub(crate) spec: RequestMatch,
    /// Normalised `gateways` of the match, or `None` to use the virtual service's.
    pub(crate) gateways: Option<Box<[Box<str>]>>,
}

/// How the URI matched, which `rewrite.uri` needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UriMatched {
    /// By prefix, of this many bytes: a rewrite replaces just the prefix.
    Prefix(usize),
    /// Exactly, by regex, or not at all: a rewrite replaces the whole path.
    Whole,
}

/// Whether a route applies, and how its URI matched. An empty match list matches everything.
pub(crate) fn route_matches(
    matches: &[Match],
    vs_gateways: &[Box<str>],
    req: &RequestInfo<'_>,
) -> Option<UriMatched> {
    if matches.is_empty() {
        return gateway_applies(vs_gateways, req.gateway).then_some(UriMatched::Whole);
    }
    matches.iter().find_map(|m| {
        let gateways = m.gateways.as_deref().unwrap_or(vs_gateways);
        if !gateway_applies(gateways, req.gateway) {
            return None;
        }
        request_matches(&m.spec, req)
    })
}

/// `mesh` admits mesh traffic (no gateway); other entries are `namespace/name` gateways.
fn gateway_applies(gateways: &[Box<str>], gateway: Option<&str>) -> bool {
    let wanted = gateway.unwrap_or("mesh");
    gateways.iter().any(|g| **g == *wanted)
}

fn request_matches(m: &RequestMatch, req: &RequestInfo<'_>) -> Option<UriMatched> {
    let path = req.uri.path();
    let uri = match &m.uri {
        None => UriMatched::Whole,
        Some(StringMatch::Exact(want)) => {
            let ok = if m.ignore_uri_case {
                path.eq_ignore_ascii_case(want)
            } else {
                path == want
            };
            ok.then_some(UriMatched::Whole)?
        }
        Some(StringMatch::Prefix(want)) => {
            let head = path.get(..want.len())?;
            let ok = if m.ignore_uri_case {
                head.eq_ignore_ascii_case(want)
            } else {
                head == want
            };
            ok.then_some(UriMatched::Prefix(want.len()))?
        }
        Some(StringMatch::PathPrefix(want)) => {
            path_prefix_matches(path, want).then_some(UriMatched::Prefix(want.len()))?
        }
        Some(StringMatch::Regex(re)) => re.is_match(path).then_some(UriMatched::Whole)?,
    };
    let port_ok = m.port.is_none_or(|p| p == req.port);
    let source_ok = m
        .source_namespace
        .as_deref()
        .is_none_or(|ns| ns == req.namespace);
    let scheme_ok = m
        .scheme
        .as_ref()
        .is_none_or(|s| string_matches(s, req.scheme));
    let method_ok = m
        .method
        .as_ref()
        .is_none_or(|s| string_matches(s, req.method.as_str()));
    let authority_ok = m
        .authority
        .as_ref()
        .is_none_or(|s| string_matches(s, req.authority));
    let headers_ok = m
        .headers
        .iter()
        .all(|(name, s)| header(req.headers, name).is_some_and(|v| string_matches(s, v)));
    // `withoutHeaders`: the request must not carry a matching value; an absent header passes.
    let without_ok = m
        .without_headers
        .iter()
        .all(|(name, s)| !header(req.headers, name).is_some_and(|v| string_matches(s, v)));
    let query_ok = m.query_params.iter().all(|(name, s)| {
        query_param(req.uri.query().unwrap_or(""), name).is_some_and(|v| string_matches(s, v))
    });
    let all =
        port_ok && source_ok && scheme_ok && method_ok && authority_ok && headers_ok && without_ok;
    (all && query_ok).then_some(uri)
}

/// The first value of a header, if it is valid text (Envoy matches non-UTF-8 values never).
fn header<'h>(headers: &'h HeaderMap, name: &http::HeaderName) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The raw (not percent-decoded) value of the first `name=` parameter; `name` alone is "".
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

pub(crate) fn string_matches(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Exact(want) => value == want,
        StringMatch::Prefix(want) => value.starts_with(want.as_str()),
        StringMatch::PathPrefix(want) => path_prefix_matches(value, want),
        // The model's regexes are anchored: `is_match` is a full match.
        StringMatch::Regex(re) => re.is_match(value),
    }
}

/// Whether `prefix` (without a trailing `/`) is a whole number of `path`'s elements.
fn path_prefix_matches(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method, Uri};

    use super::*;

    fn uri_match(m: StringMatch, path: &str) -> Option<UriMatched> {
        let uri: Uri = path.parse().unwrap();
        let headers = HeaderMap::new();
        let req = RequestInfo {
            method: &Method::GET,
            uri: &uri,
            authority: "service-c",
            scheme: "http",
            headers: &headers,
            port: 80,
            gateway: None,
            namespace: "default",
            replayable: true,
        };
        let spec = RequestMatch {
            uri: Some(m),
            ..RequestMatch::default()
        };
        request_matches(&spec, &req)
    }

    #[test]
    fn path_prefix_matches_whole_path_elements() {
        let abc = || StringMatch::PathPrefix("/abc".into());
        for path in ["/abc", "/abc/", "/abc/def", "/abc?x=1", "/abc/def?x=/abcd"] {
            assert_eq!(
                uri_match(abc(), path),
                Some(UriMatched::Prefix(4)),
                "{path}"
            );
        }
        for path in ["/abcd", "/ab", "/", "/x/abc", "/ABC"] {
            assert_eq!(uri_match(abc(), path), None, "{path}");
        }
        // `/` is stored as "": every path, and a prefix rewrite replaces nothing of it.
        for path in ["/", "/x", "/x/y"] {
            assert_eq!(
                uri_match(StringMatch::PathPrefix(String::new()), path),
                Some(UriMatched::Prefix(0)),
                "{path}"
            );
        }
        // As a header or query value too.
        assert!(string_matches(&abc(), "/abc/def"));
        assert!(!string_matches(&abc(), "/abcd"));
    }
}
