//! Workload certificates: obtained per SPIFFE identity from an [`Issuer`] (the local CA, or the
//! Kubernetes CSR API's signer), short-lived, renewed from half life (as Istio and ztunnel do),
//! handed out as `Arc`s so that a renewal never touches what a connection already holds.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use rcgen::KeyPair;
use rustls::{
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio::sync::{watch, Notify};

use super::{
    ca::{CertificateAuthority, SignError, TrustBundle},
    spiffe::SpiffeId,
};

/// A workload certificate's default lifetime (Istio's).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest lifetime accepted: renewal at half life must leave room for clock skew.
pub const MIN_LIFETIME: Duration = Duration::from_secs(20 * 60);

/// Identities one store holds at most by default: well above a node's pods (110 by default in
/// Kubernetes), each with one service account at most.
pub const DEFAULT_MAX_IDENTITIES: usize = 1024;

/// How long after a failed renewal the next attempt is made: often enough that a signer back
/// after an outage is used within a minute, rarely enough not to flood it while it is down.
pub const RENEWAL_RETRY: Duration = Duration::from_secs(30);

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

/// A wall clock that follows tokio's clock from a starting time: with tokio's time paused in a
/// test, the renewal task's sleeps and this clock move together.
#[derive(Debug)]
pub struct TokioClock {
    start: SystemTime,
    at: tokio::time::Instant,
}

impl TokioClock {
    pub fn new(start: SystemTime) -> Self {
        TokioClock {
            start,
            at: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.at.elapsed()
    }
}

/// What an issuer returns: the chain to present (leaf first) and the leaf's expiry.
#[derive(Debug)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The future of [`Issuer::issue`].
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Issued, CertificateError>> + Send + 'a>>;

/// Who signs a workload's certificate for a key the store made: the local CA at once, or a
/// remote signer (Kubernetes mode) after a round trip.
pub trait Issuer: fmt::Debug + Send + Sync {
    /// The roots peers' certificates must chain to.
    fn trust_bundle(&self) -> &TrustBundle;

    /// Signs at once, without waiting on anything (a local CA), or `None` if this issuer can
    /// only answer through [`Self::issue`]. Handshakes use it to mint inline.
    fn issue_now(
        &self,
        _identity: &SpiffeId,
        _key: &KeyPair,
        _now: SystemTime,
        _lifetime: Duration,
    ) -> Option<Result<Issued, CertificateError>> {
        None
    }

    /// Whether [`Self::issue_now`] answers; a store mints inline only then.
    fn issues_now(&self) -> bool {
        false
    }

    /// A certificate for `identity` and `key`'s public key, valid from `now` for `lifetime`
    /// (or less, as the issuer decides).
    fn issue<'a>(
        &'a self,
        identity: &'a SpiffeId,
        key: &'a KeyPair,
        now: SystemTime,
        lifetime: Duration,
    ) -> IssueFuture<'a>;
}

/// The local CA signs in process.
impl Issuer for CertificateAuthority {
    fn trust_bundle(&self) -> &TrustBundle {
        CertificateAuthority::trust_bundle(self)
    }

    fn issue_now(
        &self,
        identity: &SpiffeId,
        key: &KeyPair,
        now: SystemTime,
        lifetime: Duration,
    ) -> Option<Result<Issued, CertificateError>> {
        Some(
            self.sign(identity, key, now, lifetime)
                .map_err(CertificateError::from)
                .map(|(leaf, not_after)| Issued {
                    chain: vec![leaf],
                    not_after,
                }),
        )
    }

    fn issues_now(&self) -> bool {
        true
    }

    fn issue<'a>(
        &'a self,
        identity: &'a SpiffeId,
        key: &'a KeyPair,
        now: SystemTime,
        lifetime: Duration,
    ) -> IssueFuture<'a> {
        let issued = self
            .issue_now(identity, key, now, lifetime)
            .expect("a local CA issues at once");
        Box::pin(std::future::ready(issued))
    }
}

/// A new workload key: ECDSA P-256, as Istio's.
pub fn generate_key() -> Result<KeyPair, CertificateError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertificateError::Mint)
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
    /// Mints a key pair (ECDSA P-256) and a certificate for `identity` signed by `ca`
    /// ([`CertificateAuthority::sign`]).
    pub fn issue(
        ca: &CertificateAuthority,
        identity: &SpiffeId,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Self, CertificateError> {
        let key = generate_key()?;
        let (leaf, not_after) = ca.sign(identity, &key, now, lifetime)?;
        Self::new(
            identity,
            &key,
            Issued {
                chain: vec![leaf],
                not_after,
            },
            now,
        )
    }

    /// `key` with the chain an issuer signed for it, asked for at `issued_at`.
    pub fn new(
        identity: &SpiffeId,
        key: &KeyPair,
        issued: Issued,
        issued_at: SystemTime,
    ) -> Result<Self, CertificateError> {
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified_key =
            CertifiedKey::from_der(issued.chain, private_key, &ring::default_provider())
                .map_err(CertificateError::Key)?;
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            certified_key: Arc::new(certified_key),
            issued_at,
            not_after: issued.not_after,
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

    /// Half-way through its life: from then on a store obtains its successor.
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

    /// Held, not yet due for renewal, and not from the future (a clock stepped back).
    fn is_fresh(&self, now: SystemTime) -> bool {
        now < self.renew_at() && now >= self.issued_at
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

/// Why the last attempt to obtain an identity's certificate failed, and when to try again.
#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    retry_at: SystemTime,
}

#[derive(Debug, Default)]
struct Held {
    certificates: HashMap<SpiffeId, Arc<WorkloadCertificate>>,
    failures: HashMap<SpiffeId, Failure>,
}

/// The current certificate of each identity an agent serves, obtained from its issuer on first
/// use and again from half life on. Holding an `Arc` from it never blocks a renewal, and a
/// renewal never changes what an `Arc` already handed out holds.
///
/// With a local CA, [`Self::certificate`] mints inline. With a remote issuer, [`Self::ready`]
/// obtains the first certificate, and a renewal task ([`Self::remote`] starts it) renews each
/// held one from half life on, retrying every [`RENEWAL_RETRY`] while the issuer fails: the
/// held certificate keeps being presented until it expires, and [`Self::renewal_trouble`] (then
/// [`Self::unready_reason`], once it has expired) says
/// why renewal fails.
#[derive(Debug)]
pub struct CertificateStore {
    issuer: Arc<dyn Issuer>,
    settings: CertificateSettings,
    clock: Arc<dyn Clock>,
    held: Mutex<Held>,
    /// One issuance at a time per identity: concurrent `ready` calls share its result.
    issuing: Mutex<HashMap<SpiffeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the renewal task when a certificate is added (its schedule changes).
    renewal: Arc<Notify>,
    /// Wakes [`Self::subscribe`]rs when failures come or go.
    changes: watch::Sender<()>,
}

impl CertificateStore {
    /// A store minting from a local CA.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        settings: CertificateSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_issuer(ca, settings, clock)
    }

    /// A store obtaining certificates from `issuer`. Nothing renews them in the background
    /// unless the issuer mints inline: see [`Self::remote`].
    pub fn with_issuer(
        issuer: Arc<dyn Issuer>,
        settings: CertificateSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        CertificateStore {
            issuer,
            settings,
            clock,
            held: Mutex::new(Held::default()),
            issuing: Mutex::new(HashMap::new()),
            renewal: Arc::new(Notify::new()),
            changes: watch::Sender::new(()),
        }
    }

    /// A store obtaining certificates from a remote `issuer`, with its renewal task spawned on
    /// the current tokio runtime; the task ends when the store is dropped.
    pub fn remote(
        issuer: Arc<dyn Issuer>,
        settings: CertificateSettings,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let store = Arc::new(Self::with_issuer(issuer, settings, clock));
        tokio::spawn(renew(Arc::downgrade(&store), store.renewal.clone()));
        store
    }

    /// The certificate to present as `identity` now, without waiting: the one held unless it
    /// is past half life. A local CA then mints a new one inline; if that fails while the held
    /// one is still valid, the held one is returned (and the failure logged). With a remote
    /// issuer the held one is returned until it expires (the renewal task replaces it), and an
    /// identity never obtained through [`Self::ready`] is an error.
    pub fn certificate(
        &self,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let now = self.clock.now();
        let held = self.lock().certificates.get(identity).cloned();
        if let Some(current) = &held {
            if current.is_fresh(now) {
                return Ok(current.clone());
            }
        }
        if !self.issuer.issues_now() {
            return match held {
                Some(current) if !current.is_expired(now) => Ok(current),
                _ => Err(self.not_obtained(identity)),
            };
        }
        // Minted outside the lock: a key pair and a signature take a fraction of a millisecond
        // that other identities need not wait for. Two callers may both mint; the later wins,
        // and both certificates are valid.
        let minted = generate_key().and_then(|key| {
            let issued = self
                .issuer
                .issue_now(identity, &key, now, self.settings.lifetime)
                .expect("issues_now")?;
            WorkloadCertificate::new(identity, &key, issued, now)
        });
        match minted {
            Ok(minted) => self.insert(identity, Arc::new(minted), now, false),
            Err(error) => self.keep_held(identity, held, error, now),
        }
    }

    /// The certificate to present as `identity`, obtained first if none valid is held: what
    /// callers await before a handshake (a pod's enrollment, a tunnel's dial), so that the
    /// handshake's own synchronous [`Self::certificate`] finds it. A local CA mints at once; a
    /// remote issuer is awaited here (for as long as it allows, e.g. the CSR issuer's timeout).
    /// A held certificate past half life but still valid is returned at once, its renewal left
    /// to the renewal task.
    pub async fn ready(
        &self,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        if self.issuer.issues_now() {
            return self.certificate(identity);
        }
        if let Some(current) = self.usable(identity) {
            return Ok(current);
        }
        let gate = self.gate(identity);
        let _issuing = gate.lock().await;
        // Another caller may have obtained it while this one waited.
        if let Some(current) = self.usable(identity) {
            return Ok(current);
        }
        self.obtain(identity, false).await
    }

    /// Drops an identity no pod of this node has any more. Connections holding its certificate
    /// keep it.
    pub fn forget(&self, identity: &SpiffeId) -> bool {
        let mut held = self.lock();
        let failed = held.failures.remove(identity).is_some();
        let removed = held.certificates.remove(identity).is_some();
        drop(held);
        if failed {
            self.changes.send_replace(());
        }
        self.issuing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(identity);
        removed
    }

    /// The identities held or failing: what [`Self::forget`] may be asked to drop.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let held = self.lock();
        held.certificates
            .keys()
            .chain(held.failures.keys())
            .cloned()
            .collect()
    }

    /// Identities held.
    pub fn len(&self) -> usize {
        self.lock().certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        self.issuer.trust_bundle()
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Why this store fails some of its workloads, for the agent's readiness: the identities
    /// asked for that have no valid certificate because obtaining one failed, each with the
    /// reason. `None` while every identity asked for has a valid certificate, even if renewing
    /// it fails (see [`Self::renewal_trouble`]): a CA outage does not make the agents unready
    /// (which would take them out of the ingress Service) while their certificates still work.
    pub fn unready_reason(&self) -> Option<String> {
        self.failures(false)
    }

    /// Renewals that fail while the current certificate still works: each identity with the
    /// reason and when its certificate expires. For the log, `/ready`'s text and the lead's
    /// dashboards; not a reason to be unready (yet).
    pub fn renewal_trouble(&self) -> Option<String> {
        self.failures(true)
    }

    /// A receiver woken whenever an issuance fails or succeeds after a failure: what
    /// [`Self::unready_reason`] and [`Self::renewal_trouble`] say may have changed.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    fn failures(&self, with_valid_certificate: bool) -> Option<String> {
        let now = self.clock.now();
        let held = self.lock();
        let mut reasons: Vec<String> = held
            .failures
            .iter()
            .filter_map(|(identity, failure)| {
                let valid = held
                    .certificates
                    .get(identity)
                    .filter(|current| !current.is_expired(now));
                match (valid, with_valid_certificate) {
                    (Some(current), true) => Some(format!(
                        "renewing the certificate of {identity} failed ({}); the current one is \
                         used until it expires at {}",
                        failure.reason,
                        humantime_utc(current.not_after())
                    )),
                    (None, false) => Some(format!(
                        "no valid certificate for {identity}: {}",
                        failure.reason
                    )),
                    _ => None,
                }
            })
            .collect();
        reasons.sort();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// A held certificate that may still be presented.
    fn usable(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let now = self.clock.now();
        let current = self.lock().certificates.get(identity).cloned()?;
        if now < current.issued_at() || current.is_expired(now) {
            return None;
        }
        if !current.is_fresh(now) {
            // Past half life: the renewal task may be asleep on an older schedule.
            self.renewal.notify_one();
        }
        Some(current)
    }

    /// Asks the issuer for a certificate for `identity` (callers hold its gate). A renewal
    /// (`renewing`) of an identity forgotten meanwhile is not stored.
    async fn obtain(
        &self,
        identity: &SpiffeId,
        renewing: bool,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let now = self.clock.now();
        let held = self.lock().certificates.get(identity).cloned();
        if !renewing
            && held.is_none()
            && self.lock().certificates.len() >= self.settings.max_identities
        {
            // Checked before asking a remote signer for what could not be stored.
            self.prune(now);
            if self.lock().certificates.len() >= self.settings.max_identities {
                return Err(CertificateError::TooManyIdentities {
                    limit: self.settings.max_identities,
                });
            }
        }
        let key = generate_key()?;
        let obtained = match self
            .issuer
            .issue(identity, &key, now, self.settings.lifetime)
            .await
        {
            Ok(issued) => WorkloadCertificate::new(identity, &key, issued, now),
            Err(error) => Err(error),
        };
        match obtained {
            Ok(obtained) => self.insert(identity, Arc::new(obtained), now, renewing),
            Err(error) => self.keep_held(identity, held, error, self.clock.now()),
        }
    }

    fn insert(
        &self,
        identity: &SpiffeId,
        certificate: Arc<WorkloadCertificate>,
        now: SystemTime,
        renewing: bool,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let mut held = self.lock();
        if renewing && !held.certificates.contains_key(identity) {
            return Ok(certificate);
        }
        if !held.certificates.contains_key(identity)
            && held.certificates.len() >= self.settings.max_identities
        {
            prune(&mut held, now);
            if held.certificates.len() >= self.settings.max_identities {
                return Err(CertificateError::TooManyIdentities {
                    limit: self.settings.max_identities,
                });
            }
        }
        let recovered = held.failures.remove(identity).is_some();
        held.certificates
            .insert(identity.clone(), certificate.clone());
        drop(held);
        if recovered {
            self.changes.send_replace(());
        }
        self.renewal.notify_one();
        Ok(certificate)
    }

    /// An issuance failed: the held certificate is used until it expires, and the failure is
    /// remembered for readiness and the next retry.
    fn keep_held(
        &self,
        identity: &SpiffeId,
        held: Option<Arc<WorkloadCertificate>>,
        error: CertificateError,
        now: SystemTime,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let mut state = self.lock();
        if state.certificates.contains_key(identity) || held.is_none() {
            state.failures.insert(
                identity.clone(),
                Failure {
                    reason: error.to_string(),
                    retry_at: now + RENEWAL_RETRY,
                },
            );
        }
        drop(state);
        self.changes.send_replace(());
        match held {
            Some(current) if !current.is_expired(now) => {
                tracing::warn!(%identity, %error, "renewing a workload certificate failed; the current one is used until it expires");
                Ok(current)
            }
            _ => Err(error),
        }
    }

    fn not_obtained(&self, identity: &SpiffeId) -> CertificateError {
        let reason = self
            .lock()
            .failures
            .get(identity)
            .map(|failure| failure.reason.clone());
        CertificateError::NotObtained {
            identity: identity.clone(),
            reason: reason.unwrap_or_else(|| "not yet asked for".to_owned()),
        }
    }

    fn prune(&self, now: SystemTime) {
        prune(&mut self.lock(), now);
    }

    fn gate(&self, identity: &SpiffeId) -> Arc<tokio::sync::Mutex<()>> {
        self.issuing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(identity.clone())
            .or_default()
            .clone()
    }

    /// The identities due for renewal at `now`, and when the next one falls due.
    fn schedule(&self, now: SystemTime) -> (Vec<SpiffeId>, Option<SystemTime>) {
        let held = self.lock();
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for (identity, certificate) in &held.certificates {
            // From half life on; after a failure, not before its retry time.
            let mut at = certificate.renew_at();
            if let Some(failure) = held.failures.get(identity) {
                at = at.max(failure.retry_at);
            }
            if at <= now {
                due.push(identity.clone());
            } else {
                next = Some(next.map_or(at, |next| next.min(at)));
            }
        }
        (due, next)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // The maps are consistent after every statement: a panic elsewhere cannot leave them
        // torn.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops expired certificates, to make room for a new identity.
fn prune(held: &mut Held, now: SystemTime) {
    held.certificates
        .retain(|_, certificate| !certificate.is_expired(now));
    let Held {
        certificates,
        failures,
    } = held;
    failures.retain(|identity, _| certificates.contains_key(identity));
}

/// The renewal task of a store with a remote issuer: renews each certificate from half life on,
/// at most [`RENEWALS_AT_ONCE`] at a time (a signer is not flooded when a whole node's
/// certificates fall due together, and one slow answer does not hold up the others), and sleeps
/// until the next falls due or a certificate is added.
async fn renew(store: Weak<CertificateStore>, wake: Arc<Notify>) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let Some(store) = store.upgrade() else { return };
            let (due, _) = store.schedule(store.clock.now());
            futures_util::stream::iter(due)
                .for_each_concurrent(RENEWALS_AT_ONCE, |identity| {
                    let store = &store;
                    async move {
                        let gate = store.gate(&identity);
                        let _issuing = gate.lock().await;
                        let fresh = store
                            .lock()
                            .certificates
                            .get(&identity)
                            .is_some_and(|current| current.is_fresh(store.clock.now()));
                        if fresh {
                            return;
                        }
                        match store.obtain(&identity, true).await {
                            Ok(_) => tracing::debug!(%identity, "renewed a workload certificate"),
                            Err(error) => tracing::warn!(
                                %identity, %error, "renewing a workload certificate failed"
                            ),
                        }
                    }
                })
                .await;
            let now = store.clock.now();
            let (due, next) = store.schedule(now);
            if !due.is_empty() {
                // Fell due while the others were renewed.
                continue;
            }
            next.map(|next| next.duration_since(now).unwrap_or_default())
        };
        match next {
            Some(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Renewals in flight at once, per store.
const RENEWALS_AT_ONCE: usize = 8;

/// The readiness condition a store's failures hold (see [`report_readiness`]).
pub const READINESS_CONDITION: &str = "workload certificates";

/// Mirrors `store`'s [`CertificateStore::unready_reason`] into the agent's readiness (the
/// [`READINESS_CONDITION`]) until the store is dropped. (Renewal failures, while certificates
/// still work, are logged by the renewal task and told by [`CertificateStore::renewal_trouble`].) Rechecked on every failure or recovery, and every [`RENEWAL_RETRY`] (a certificate
/// expiring while its renewal fails changes the answer without a new failure).
pub fn report_readiness(
    store: &Arc<CertificateStore>,
    readiness: Arc<crate::readiness::Readiness>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = store.subscribe();
    let store = Arc::downgrade(store);
    tokio::spawn(async move {
        loop {
            {
                let Some(store) = store.upgrade() else { return };
                match store.unready_reason() {
                    Some(reason) => readiness.waiting(READINESS_CONDITION, reason),
                    None => readiness.done(READINESS_CONDITION),
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RENEWAL_RETRY) => {}
            }
        }
    })
}

/// A time as RFC 3339 UTC, for messages.
fn humantime_utc(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{at:?}"))
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("already holding certificates for {limit} identities, the most allowed")]
    TooManyIdentities { limit: usize },
    #[error("minting a workload certificate: {0}")]
    Mint(rcgen::Error),
    #[error("loading a workload key into rustls: {0}")]
    Key(rustls::Error),
    #[error("no certificate for {identity} yet: {reason}")]
    NotObtained { identity: SpiffeId, reason: String },
    /// A remote signer refused, failed or did not answer in time.
    #[error("{0}")]
    Issuer(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca::CLOCK_SKEW, spiffe::TrustDomain};
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
            matches!(
                error,
                CertificateError::Sign(SignError::ForeignTrustDomain { .. })
            ),
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

    /// A remote signer stand-in: signs with a CA after a round trip, or fails while told to.
    #[derive(Debug)]
    struct Remote {
        ca: Arc<CertificateAuthority>,
        failing: std::sync::atomic::AtomicBool,
        issued: std::sync::atomic::AtomicUsize,
    }

    impl Remote {
        fn new(ca: Arc<CertificateAuthority>) -> Arc<Self> {
            Arc::new(Remote {
                ca,
                failing: Default::default(),
                issued: Default::default(),
            })
        }

        fn fail(&self, failing: bool) {
            self.failing
                .store(failing, std::sync::atomic::Ordering::SeqCst);
        }

        fn issued(&self) -> usize {
            self.issued.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl Issuer for Remote {
        fn trust_bundle(&self) -> &TrustBundle {
            self.ca.trust_bundle()
        }

        fn issue<'a>(
            &'a self,
            identity: &'a SpiffeId,
            key: &'a KeyPair,
            now: SystemTime,
            lifetime: Duration,
        ) -> IssueFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(CertificateError::Issuer("the signer is unreachable".into()));
                }
                self.issued
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (leaf, not_after) = self.ca.sign(identity, key, now, lifetime)?;
                Ok(Issued {
                    chain: vec![leaf],
                    not_after,
                })
            })
        }
    }

    fn remote_store(start: SystemTime) -> (Arc<Remote>, Arc<CertificateStore>) {
        let remote = Remote::new(ca(start));
        let clock = Arc::new(TokioClock::new(start));
        let store = CertificateStore::remote(remote.clone(), CertificateSettings::default(), clock);
        (remote, store)
    }

    #[tokio::test(start_paused = true)]
    async fn a_remote_issuer_is_awaited_once_and_renews_from_half_life() {
        let start = SystemTime::now();
        let (remote, store) = remote_store(start);
        let error = store.certificate(&id("web")).unwrap_err();
        assert!(
            matches!(error, CertificateError::NotObtained { .. }),
            "a handshake does not wait on a signer: {error}"
        );
        let web = id("web");
        let (first, second) = tokio::join!(store.ready(&web), store.ready(&web));
        let first = first.unwrap();
        assert!(Arc::ptr_eq(&first, &second.unwrap()), "one issuance shared");
        assert_eq!(remote.issued(), 1);
        assert!(Arc::ptr_eq(&first, &store.certificate(&id("web")).unwrap()));
        assert_eq!(first.not_after(), first.issued_at() + DEFAULT_LIFETIME);

        tokio::time::sleep(12 * HOUR - Duration::from_secs(1) - Duration::from_millis(50)).await;
        assert_eq!(remote.issued(), 1, "not renewed before half life");
        assert!(Arc::ptr_eq(&first, &store.certificate(&id("web")).unwrap()));

        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            remote.issued(),
            2,
            "renewed at half life, without anyone asking"
        );
        let renewed = store.certificate(&id("web")).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(renewed.issued_at(), first.renew_at());
        assert!(store.unready_reason().is_none());

        // And again at the successor's half life.
        tokio::time::sleep(12 * HOUR).await;
        assert_eq!(remote.issued(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_issuer_leaves_the_held_certificate_in_use_until_it_expires() {
        let start = SystemTime::now();
        let (remote, store) = remote_store(start);
        let first = store.ready(&id("web")).await.unwrap();

        remote.fail(true);
        tokio::time::sleep(12 * HOUR + Duration::from_secs(1)).await;
        let held = store.certificate(&id("web")).unwrap();
        assert!(
            Arc::ptr_eq(&first, &held),
            "still presented after a failed renewal"
        );
        assert!(Arc::ptr_eq(&first, &store.ready(&id("web")).await.unwrap()));
        let reason = store.renewal_trouble().expect("the trouble is reported");
        assert!(
            reason.contains("spiffe://cluster.local/ns/shop/sa/web"),
            "{reason}"
        );
        assert!(reason.contains("the signer is unreachable"), "{reason}");
        assert!(reason.contains("used until it expires"), "{reason}");
        assert!(
            store.unready_reason().is_none(),
            "ready while the certificate works"
        );

        // Retried every RENEWAL_RETRY, never presented past its expiry.
        tokio::time::sleep(12 * HOUR).await;
        let error = store.certificate(&id("web")).unwrap_err();
        assert!(
            error.to_string().contains("the signer is unreachable"),
            "{error}"
        );
        let reason = store.unready_reason().unwrap();
        assert!(reason.contains("no valid certificate"), "{reason}");
        assert!(store.renewal_trouble().is_none());
        assert!(store.ready(&id("web")).await.is_err());

        // The signer is back: the next retry renews it.
        remote.fail(false);
        tokio::time::sleep(RENEWAL_RETRY + Duration::from_secs(1)).await;
        let renewed = store.certificate(&id("web")).unwrap();
        assert!(!renewed.is_expired(store.clock().now()));
        assert!(store.unready_reason().is_none() && store.renewal_trouble().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_full_of_identities_renews_in_parallel() {
        let start = SystemTime::now();
        let (remote, store) = remote_store(start);
        let identities: Vec<SpiffeId> = (0..16).map(|n| id(&format!("sa{n}"))).collect();
        // Obtained together, they fall due together.
        for obtained in
            futures_util::future::join_all(identities.iter().map(|id| store.ready(id))).await
        {
            obtained.unwrap();
        }
        assert_eq!(remote.issued(), 16);
        // 8 at once, each answer taking 50 ms: all renewed within 2 answers' time (one at a
        // time would take 800 ms).
        tokio::time::sleep(12 * HOUR - Duration::from_millis(50)).await;
        assert_eq!(remote.issued(), 16);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(remote.issued(), 32);
        for identity in &identities {
            let current = store.certificate(identity).unwrap();
            assert!(
                current.issued_at() >= start + 12 * HOUR,
                "{identity} renewed"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_the_store() {
        use crate::readiness::Readiness;
        let start = SystemTime::now();
        let (remote, store) = remote_store(start);
        let readiness = Arc::new(Readiness::starting());
        readiness.done(crate::readiness::START_UP);
        let _reporter = report_readiness(&store, readiness.clone());
        remote.fail(true);
        assert!(store.ready(&id("web")).await.is_err());
        tokio::task::yield_now().await;
        let why = readiness.check().unwrap_err();
        assert!(
            why.starts_with("workload certificates (no valid certificate for spiffe://"),
            "{why}"
        );
        remote.fail(false);
        store.ready(&id("web")).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(readiness.check(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_issuance_is_an_error_and_a_reason() {
        let start = SystemTime::now();
        let (remote, store) = remote_store(start);
        remote.fail(true);
        let error = store.ready(&id("web")).await.unwrap_err();
        assert!(matches!(error, CertificateError::Issuer(_)), "{error}");
        assert!(store
            .unready_reason()
            .unwrap()
            .contains("no valid certificate"));
        remote.fail(false);
        store.ready(&id("web")).await.unwrap();
        assert!(store.unready_reason().is_none());
        // Forgetting an identity stops its renewal.
        assert!(store.forget(&id("web")));
        tokio::time::sleep(DEFAULT_LIFETIME).await;
        assert_eq!(remote.issued(), 1);
    }
}
