//! A workload's cryptographic identity, as Istio names it: the SPIFFE ID
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` carried as the only URI SAN of
//! its certificate. Parsed strictly: a peer's certificate is trusted for exactly the identity it
//! names, so two spellings of one identity must not exist.

use std::{fmt, str::FromStr, sync::Arc};

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
const SHAPE: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

/// The trust domain of a mesh: every identity its CA signs lives in it. The SPIFFE spec's rules:
/// lowercase letters, digits, `.`, `-` and `_`, at most 255 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let invalid = |reason: String| SpiffeIdError::TrustDomain {
            input: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if name.len() > 255 {
            return Err(invalid(format!(
                "it is {} characters long, more than 255",
                name.len()
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(invalid(format!(
                "{c:?} is not allowed (lowercase letters, digits, '.', '-' and '_' are)"
            )));
        }
        Ok(TrustDomain(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<trust-domain>`: the URI SAN of its CA.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        TrustDomain(DEFAULT_TRUST_DOMAIN.to_owned())
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload's identity: its namespace's service account in a trust domain. Cheap to clone
/// (one `Arc`): connection pools and telemetry labels carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    // The URI first: ordering and hashing by it are ordering and hashing by the identity.
    uri: String,
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// `namespace` must be a Kubernetes namespace name (an RFC 1123 label) and `service_account`
    /// a service account name (an RFC 1123 subdomain), which also makes them valid SPIFFE path
    /// segments.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let invalid = |reason: String| SpiffeIdError::Id {
            input: uri.clone(),
            reason,
        };
        check_label(namespace).map_err(|e| invalid(format!("namespace {namespace:?}: {e}")))?;
        check_subdomain(service_account)
            .map_err(|e| invalid(format!("service account {service_account:?}: {e}")))?;
        Ok(SpiffeId(Arc::new(Parts {
            uri,
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and nothing else:
    /// no port, user, query, fragment, percent-encoding, upper case or trailing slash.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        let invalid = |reason: &str| SpiffeIdError::Id {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("it has no path"))?;
        let trust_domain = TrustDomain::new(trust_domain).map_err(|e| SpiffeIdError::Id {
            input: input.to_owned(),
            reason: e.to_string(),
        })?;
        let segments: Vec<&str> = path.split('/').collect();
        let [ns, namespace, sa, service_account] = segments[..] else {
            return Err(invalid(
                "its path is not /ns/<namespace>/sa/<service-account>",
            ));
        };
        if ns != "ns" || sa != "sa" {
            return Err(invalid(
                "its path is not /ns/<namespace>/sa/<service-account>",
            ));
        }
        // The URI `new` rebuilds from the parts is `input` itself: one spelling per identity.
        SpiffeId::new(trust_domain, namespace, service_account)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The URI, as in a certificate's SAN and Istio's `*_principal` labels.
    pub fn as_str(&self) -> &str {
        &self.0.uri
    }

    /// The URI without `spiffe://`, as an `AuthorizationPolicy` names principals.
    pub fn principal(&self) -> &str {
        &self.0.uri[SCHEME.len()..]
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("invalid trust domain {input:?}: {reason}")]
    TrustDomain { input: String, reason: String },
    #[error("invalid SPIFFE ID {input:?}: {reason}; expected {SHAPE}")]
    Id { input: String, reason: String },
}

/// An RFC 1123 label, as Kubernetes checks namespace names.
fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > 63 {
        return Err(format!("it is {} characters long, more than 63", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(format!(
            "{c:?} is not allowed (lowercase letters, digits and '-' are)"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("it must start and end with a letter or digit".into());
    }
    Ok(())
}

/// An RFC 1123 subdomain, as Kubernetes checks service account names.
fn check_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("it is {} characters long, more than 253", s.len()));
    }
    s.split('.').try_for_each(check_label)
}

/// The two ends of a tunnel: the identity that connects and the one expected to answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub source: SpiffeId,
    pub destination: SpiffeId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_istio_identity_parses_and_displays_as_it_was_written() {
        let text = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
        let id: SpiffeId = text.parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "bookinfo");
        assert_eq!(id.service_account(), "bookinfo-reviews");
        assert_eq!(id.to_string(), text);
        assert_eq!(id.as_str(), text);
        let built = SpiffeId::new(TrustDomain::default(), "bookinfo", "bookinfo-reviews").unwrap();
        assert_eq!(built, id);
        // A service account name may have dots (an RFC 1123 subdomain).
        assert!(SpiffeId::parse("spiffe://td_1.example/ns/a-1/sa/build.bot").is_ok());
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let cases = [
            (
                "http://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/", "path is not"),
            ("spiffe://cluster.local/ns/a/sa/b/", "path is not"),
            ("spiffe://cluster.local/ns/a/sa", "path is not"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "path is not"),
            ("spiffe://cluster.local/namespace/a/sa/b", "path is not"),
            ("spiffe://cluster.local//ns/a/sa/b", "path is not"),
            ("spiffe://Cluster.local/ns/a/sa/b", "'C' is not allowed"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "':' is not allowed"),
            (
                "spiffe://user@cluster.local/ns/a/sa/b",
                "'@' is not allowed",
            ),
            ("spiffe:///ns/a/sa/b", "trust domain \"\": it is empty"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace \"A\""),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=1",
                "service account \"b?x=1\"",
            ),
            ("spiffe://cluster.local/ns/a/sa/b#f", "'#' is not allowed"),
            ("spiffe://cluster.local/ns/a%2fb/sa/b", "'%' is not allowed"),
            ("spiffe://cluster.local/ns/-a/sa/b", "start and end"),
            ("spiffe://cluster.local/ns/a/sa/b..c", "it is empty"),
            (
                "spiffe://cluster.local/ns//sa/b",
                "namespace \"\": it is empty",
            ),
        ];
        for (input, reason) in cases {
            let error = SpiffeId::parse(input).unwrap_err().to_string();
            assert!(error.contains(reason), "{input}: {error}");
            assert!(error.contains(SHAPE), "{input}: {error}");
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(64));
        assert!(SpiffeId::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("more than 63"));
    }

    #[test]
    fn trust_domains_follow_the_spiffe_rules() {
        assert_eq!(TrustDomain::default().as_str(), DEFAULT_TRUST_DOMAIN);
        assert_eq!(
            TrustDomain::new("example.org").unwrap().uri(),
            "spiffe://example.org"
        );
        for bad in ["", "Example.org", "a/b", "a b", &"a".repeat(256)] {
            assert!(TrustDomain::new(bad).is_err(), "{bad:?}");
        }
    }
}
