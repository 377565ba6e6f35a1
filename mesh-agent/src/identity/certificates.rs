//! Workload certificates: minted per SPIFFE identity, short-lived, renewed at half life (as
//! Istio and ztunnel do), handed out as `Arc`s so that a renewal never touches what a
//! connection already holds.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::{
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};

use super::{
    ca::{CertificateAuthority, TrustBundle, CLOCK_SKEW},
    spiffe::SpiffeId,
};

/// A workload certificate's default lifetime (Istio's).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest lifetime accepted: renewal at half life must leave room for clock skew.
pub const MIN_LIFETIME: Duration = Duration::from_secs(20 * 60);

/// Identities one store holds at most by default: well above a node's pods (110 by default in
/// Kubernetes), each with one service account at most.
pub const DEFAULT_MAX_IDENTITIES: usize = 1024;

/// The wall clock, injected so that expiry and renewal are tested without sleeping.
pub trait Clock: fmt::Debug + Send + Sync {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to: for tests, here and in the tunnel's.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(now: SystemTime) -> Self {
        ManualClock(Mutex::new(now))
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }

    pub fn set(&self, now: SystemTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One workload's certificate and key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCertificate {
    identity: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    issued_at: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Mints a key pair (ECDSA P-256) and a certificate for `identity` signed by `ca`: the
    /// SPIFFE ID as its only SAN (a URI SAN, critical as the subject is empty), key usages
    /// digitalSignature and keyEncipherment, extended key usages serverAuth and clientAuth
    /// (Istio's workload certificates). Valid from `now` (less [`CLOCK_SKEW`]) for `lifetime`,
    /// never past the CA's own expiry.
    pub fn issue(
        ca: &CertificateAuthority,
        identity: &SpiffeId,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Self, CertificateError> {
        if identity.trust_domain() != ca.trust_domain() {
            return Err(CertificateError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: ca.trust_domain().to_string(),
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(CertificateError::Mint)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .as_str()
                .try_into()
                .map_err(CertificateError::Mint)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = (now + lifetime).min(ca.not_after());
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        let certificate = params
            .signed_by(&key, ca.issuer())
            .map_err(CertificateError::Mint)?;
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified_key = CertifiedKey::from_der(
            vec![CertificateDer::from(certificate)],
            private_key,
            &ring::default_provider(),
        )
        .map_err(CertificateError::Key)?;
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            certified_key: Arc::new(certified_key),
            issued_at: now,
            not_after,
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The chain and key rustls presents; a connection holding it keeps it past renewal.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The leaf certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certified_key.cert[0]
    }

    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Half-way through its life: from then on a store mints its successor.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// How a store mints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertificateSettings {
    pub lifetime: Duration,
    pub max_identities: usize,
}

impl Default for CertificateSettings {
    fn default() -> Self {
        CertificateSettings {
            lifetime: DEFAULT_LIFETIME,
            max_identities: DEFAULT_MAX_IDENTITIES,
        }
    }
}

impl CertificateSettings {
    /// Fails when the lifetime is shorter than [`MIN_LIFETIME`] or no identity may be held.
    pub fn new(lifetime: Duration, max_identities: usize) -> Result<Self, String> {
        if lifetime < MIN_LIFETIME {
            return Err(format!(
                "a certificate lifetime of {lifetime:?} is shorter than the minimum, {MIN_LIFETIME:?}"
            ));
        }
        if max_identities == 0 {
            return Err("a store must be allowed at least one identity".into());
        }
        Ok(CertificateSettings {
            lifetime,
            max_identities,
        })
    }
}

/// The current certificate of each identity an agent serves, minted by a local CA on first use
/// and again from half life on. Holding an `Arc` from it never blocks a renewal, and a renewal
/// never changes what an `Arc` already handed out holds.
#[derive(Debug)]
pub struct CertificateStore {
    ca: Arc<CertificateAuthority>,
    settings: CertificateSettings,
    clock: Arc<dyn Clock>,
    held: Mutex<HashMap<SpiffeId, Arc<WorkloadCertificate>>>,
}

impl CertificateStore {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        settings: CertificateSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        CertificateStore {
            ca,
            settings,
            clock,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The certificate to present as `identity` now: the one held unless it is past half life,
    /// else a new one. If minting fails while the held one is still valid, the held one is
    /// returned (and the failure logged): certificates keep working until they expire.
    pub fn certificate(
        &self,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let now = self.clock.now();
        let held = self.lock().get(identity).cloned();
        if let Some(current) = &held {
            if now < current.renew_at() && now >= current.issued_at() {
                return Ok(current.clone());
            }
        }
        // Minted outside the lock: a key pair and a signature take a fraction of a millisecond
        // that other identities need not wait for. Two callers may both mint; the later wins,
        // and both certificates are valid.
        let minted = match WorkloadCertificate::issue(
            &self.ca,
            identity,
            now,
            self.settings.lifetime,
        ) {
            Ok(minted) => Arc::new(minted),
            Err(error) => {
                return match held {
                    Some(current) if !current.is_expired(now) => {
                        tracing::warn!(%identity, %error, "renewing a workload certificate failed; the current one is used until it expires");
                        Ok(current)
                    }
                    _ => Err(error),
                };
            }
        };
        let mut held = self.lock();
        if !held.contains_key(identity) && held.len() >= self.settings.max_identities {
            held.retain(|_, certificate| !certificate.is_expired(now));
            if held.len() >= self.settings.max_identities {
                return Err(CertificateError::TooManyIdentities {
                    limit: self.settings.max_identities,
                });
            }
        }
        held.insert(identity.clone(), minted.clone());
        Ok(minted)
    }

    /// The certificate to present as `identity`, obtained first if none is held: what callers
    /// await before a handshake (a pod's enrollment, a tunnel's dial), so the handshake's own
    /// synchronous [`Self::certificate`] finds it. Minting from a local CA is immediate; an
    /// issuer that asks a remote signer (Kubernetes mode) is awaited here.
    pub async fn ready(
        &self,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        self.certificate(identity)
    }

    /// Drops an identity no pod of this node has any more. Connections holding its certificate
    /// keep it.
    pub fn forget(&self, identity: &SpiffeId) -> bool {
        self.lock().remove(identity).is_some()
    }

    /// Identities held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        self.ca.trust_bundle()
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Arc<WorkloadCertificate>>> {
        // The map is consistent after every statement: a panic elsewhere cannot leave it torn.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{identity} is not in trust domain {trust_domain}, the only one this CA signs for")]
    ForeignTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("already holding certificates for {limit} identities, the most allowed")]
    TooManyIdentities { limit: usize },
    #[error("minting a workload certificate: {0}")]
    Mint(rcgen::Error),
    #[error("loading a workload key into rustls: {0}")]
    Key(rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::spiffe::TrustDomain;
    use x509_parser::extensions::ParsedExtension;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ca(now: SystemTime) -> Arc<CertificateAuthority> {
        Arc::new(
            CertificateAuthority::generate(TrustDomain::default(), now, 365 * 24 * HOUR).unwrap(),
        )
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TrustDomain::default(), "shop", sa).unwrap()
    }

    #[test]
    fn a_workload_certificate_is_what_istio_mints() {
        let now = SystemTime::now();
        let ca = ca(now);
        let minted = WorkloadCertificate::issue(&ca, &id("web"), now, DEFAULT_LIFETIME).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(minted.certificate()).unwrap();
        assert_eq!(
            crate::identity::ca::uri_sans(&cert).unwrap(),
            ["spiffe://cluster.local/ns/shop/sa/web"]
        );
        assert!(cert.subject().iter().next().is_none(), "empty subject");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.critical,
            "with an empty subject the SAN is critical (RFC 5280)"
        );
        assert!(!cert.is_ca());
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && usage.key_encipherment());
        assert!(!usage.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let curve = cert.public_key().algorithm.parameters.as_ref().unwrap();
        assert_eq!(
            curve.as_oid().unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        let validity = cert.validity();
        let lifetime = (validity.not_after - validity.not_before)
            .unwrap()
            .whole_seconds();
        assert_eq!(
            lifetime as u64,
            (DEFAULT_LIFETIME + CLOCK_SKEW).as_secs(),
            "24 h from now, plus the clock skew allowance before it"
        );
        assert!(cert.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::AuthorityKeyIdentifier(_)
        )));
        assert_eq!(minted.renew_at(), now + DEFAULT_LIFETIME / 2);
    }

    #[test]
    fn the_ca_signs_only_its_own_trust_domain_and_never_past_its_expiry() {
        let now = SystemTime::now();
        let ca = ca(now);
        let foreign = SpiffeId::parse("spiffe://other.org/ns/shop/sa/web").unwrap();
        let error = WorkloadCertificate::issue(&ca, &foreign, now, DEFAULT_LIFETIME).unwrap_err();
        assert!(
            matches!(error, CertificateError::ForeignTrustDomain { .. }),
            "{error}"
        );

        let late = ca.not_after() - HOUR;
        let minted = WorkloadCertificate::issue(&ca, &id("web"), late, DEFAULT_LIFETIME).unwrap();
        assert_eq!(minted.not_after(), ca.not_after());
        assert_eq!(minted.renew_at(), late + HOUR / 2);
    }

    #[test]
    fn the_store_renews_at_half_life_and_leaves_held_certificates_alone() {
        let start = SystemTime::now();
        let clock = Arc::new(ManualClock::new(start));
        let store = CertificateStore::new(ca(start), CertificateSettings::default(), clock.clone());
        let first = store.certificate(&id("web")).unwrap();
        assert!(Arc::ptr_eq(&first, &store.certificate(&id("web")).unwrap()));

        clock.advance(12 * HOUR - Duration::from_secs(1));
        assert!(Arc::ptr_eq(&first, &store.certificate(&id("web")).unwrap()));

        clock.advance(Duration::from_secs(1));
        let second = store.certificate(&id("web")).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.certificate(), second.certificate());
        assert_eq!(second.issued_at(), start + 12 * HOUR);
        // What a connection held is untouched, and still valid for its remaining half life.
        assert_eq!(first.issued_at(), start);
        assert!(!first.is_expired(clock.now()));
        assert!(Arc::ptr_eq(
            &second,
            &store.certificate(&id("web")).unwrap()
        ));

        // A clock set back before the held certificate's issue (NTP step) gets a fresh one
        // rather than one not yet valid.
        clock.set(start);
        let third = store.certificate(&id("web")).unwrap();
        assert_eq!(third.issued_at(), start);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn the_store_holds_at_most_its_cap_of_identities() {
        let start = SystemTime::now();
        let clock = Arc::new(ManualClock::new(start));
        let settings = CertificateSettings::new(DEFAULT_LIFETIME, 2).unwrap();
        let store = CertificateStore::new(ca(start), settings, clock.clone());
        store.certificate(&id("a")).unwrap();
        store.certificate(&id("b")).unwrap();
        let error = store.certificate(&id("c")).unwrap_err();
        assert!(
            matches!(error, CertificateError::TooManyIdentities { limit: 2 }),
            "{error}"
        );
        assert_eq!(store.len(), 2);
        // Held identities are still served, and renewed, at the cap.
        store.certificate(&id("a")).unwrap();
        clock.advance(13 * HOUR);
        store.certificate(&id("a")).unwrap();

        // Forgetting one makes room.
        assert!(store.forget(&id("a")));
        assert!(!store.forget(&id("a")));
        store.certificate(&id("c")).unwrap();

        // So does expiry: b's certificate has run out (its pod is gone, nobody renewed it).
        clock.advance(12 * HOUR);
        store.certificate(&id("c")).unwrap();
        store.certificate(&id("d")).unwrap();
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn settings_refuse_what_cannot_work() {
        assert!(CertificateSettings::new(Duration::from_secs(60), 10).is_err());
        assert!(CertificateSettings::new(DEFAULT_LIFETIME, 0).is_err());
        assert_eq!(
            CertificateSettings::new(DEFAULT_LIFETIME, DEFAULT_MAX_IDENTITIES).unwrap(),
            CertificateSettings::default()
        );
    }
}
