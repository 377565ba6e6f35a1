//! The mesh's certificate authority in local mode, and the trust bundle every agent checks peers
//! against.
//!
//! A CA folder holds, with the file names of Istio's plugged-in CA (`cacerts`):
//! - `ca-key.pem`: the root's private key (PKCS#8, ECDSA P-256), mode 0600;
//! - `ca-cert.pem`: the root's self-signed certificate, whose URI SAN `spiffe://<trust-domain>`
//!   names the trust domain it signs for;
//! - `root-cert.pem`: the trust bundle, one or more root certificates. `ca init` writes the new
//!   root alone; during a CA rotation it holds the old root and the new one, so that workloads
//!   certified by either are trusted while certificates roll over.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer},
    RootCertStore,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::spiffe::{SpiffeId, TrustDomain};

pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// How long a root made by `ca init` is valid: Istio's self-signed root default.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How far back a new certificate's validity starts, for nodes whose clocks lag the signer's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A root CA: signs the workload certificates of one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    not_after: SystemTime,
    bundle: TrustBundle,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the issuer: it holds the key.
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new root, in memory only, valid from `now` (less [`CLOCK_SKEW`]) for `validity`.
    pub fn generate(
        trust_domain: TrustDomain,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Mint)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        // Istio's roots carry the trust domain as organization; the time in the common name
        // tells an old root from its successor in a bundle holding both.
        name.push(DnType::OrganizationName, trust_domain.as_str());
        let created = time::OffsetDateTime::from(now);
        name.push(
            DnType::CommonName,
            format!("mesh root CA {}", created.unix_timestamp()),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            trust_domain.uri().try_into().map_err(CaError::Mint)?,
        )];
        params.not_before = (now - CLOCK_SKEW).into();
        let not_after = now + validity;
        params.not_after = not_after.into();
        let certificate = params.self_signed(&key).map_err(CaError::Mint)?;
        let certificate = certificate.der().clone();
        let bundle = TrustBundle::new(trust_domain.clone(), vec![certificate.clone()]).map_err(
            |reason| CaError::Invalid {
                path: PathBuf::from("(new root)"),
                reason,
            },
        )?;
        Ok(CertificateAuthority {
            trust_domain,
            issuer: Issuer::new(params, key),
            certificate,
            not_after,
            bundle,
        })
    }

    /// Makes a new root in `dir` (created if missing, mode 0700): `ca-key.pem` (0600),
    /// `ca-cert.pem` and `root-cert.pem`. Refuses if any of them exists: overwriting a CA would
    /// leave every certificate it signed untrusted.
    pub fn init(dir: &Path, trust_domain: TrustDomain, now: SystemTime) -> Result<Self, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::Io {
                path: dir.to_owned(),
                source,
            })?;
        for file in [CA_KEY_FILE, CA_CERT_FILE, ROOT_CERT_FILE] {
            let path = dir.join(file);
            if path.exists() {
                return Err(CaError::Exists { path });
            }
        }
        let ca = CertificateAuthority::generate(trust_domain, now, ROOT_VALIDITY)?;
        let certificate_pem = pem(&ca.certificate);
        let files = [
            (CA_KEY_FILE, 0o600, ca.issuer.key().serialize_pem()),
            (CA_CERT_FILE, 0o644, certificate_pem.clone()),
            (ROOT_CERT_FILE, 0o644, certificate_pem),
        ];
        let mut written = Vec::new();
        for (file, mode, contents) in files {
            let path = dir.join(file);
            if let Err(error) = write_new(&path, mode, contents.as_bytes()) {
                // All or nothing: a half-written CA would be refused by `load` and block the
                // next `init`.
                for path in written {
                    let _ = fs::remove_file(path);
                }
                return Err(error);
            }
            written.push(path);
        }
        Ok(ca)
    }

    /// Loads the CA in `dir`, checking that it can sign at `now`: the key is private to its
    /// owner and matches the certificate, the certificate is a CA's, valid now, naming its trust
    /// domain, and the trust bundle holds it.
    pub fn load(dir: &Path, now: SystemTime) -> Result<Self, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let invalid = |path: &Path, reason: String| CaError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let key_text = read(&key_path)?;
        let mode = fs::metadata(&key_path)
            .map_err(|source| CaError::Io {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(invalid(
                &key_path,
                format!(
                    "mode {:04o} lets others than its owner read the CA's key; chmod 600 it",
                    mode & 0o7777
                ),
            ));
        }
        let key = KeyPair::from_pem(&key_text)
            .map_err(|e| invalid(&key_path, format!("not a PEM private key: {e}")))?;

        let cert_path = dir.join(CA_CERT_FILE);
        let certificate = only_certificate(&cert_path, &read(&cert_path)?)?;
        let trust_domain =
            check_root(&certificate, now).map_err(|reason| invalid(&cert_path, reason))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&certificate)
            .map_err(|e| invalid(&cert_path, e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(
                &key_path,
                format!("this key does not match {CA_CERT_FILE}'s public key"),
            ));
        }
        let not_after = parsed.validity().not_after.to_datetime().into();
        let issuer = Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|e| invalid(&cert_path, e.to_string()))?;

        let bundle_path = dir.join(ROOT_CERT_FILE);
        let bundle = TrustBundle::load(&bundle_path, trust_domain.clone(), now)?;
        if !bundle.roots().contains(&certificate) {
            return Err(invalid(
                &bundle_path,
                format!(
                    "it does not hold {CA_CERT_FILE}'s certificate: the workloads this CA \
                     signs would not be trusted"
                ),
            ));
        }
        Ok(CertificateAuthority {
            trust_domain,
            issuer,
            certificate,
            not_after,
            bundle,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root's certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The roots peers are checked against: this CA's, and any other root the folder's
    /// `root-cert.pem` holds (the previous one during a rotation).
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    #[cfg(test)]
    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Signs a workload certificate for `identity` and `public_key`: the SPIFFE ID as its only
    /// SAN (a URI SAN, critical as the subject is empty), key usages digitalSignature and
    /// keyEncipherment, extended key usages serverAuth and clientAuth (Istio's workload
    /// certificates). Valid from `now` (less [`CLOCK_SKEW`]) for `lifetime`, never past this
    /// CA's own expiry. Returns the certificate and its expiry. Whatever else a requester asked
    /// for (a CSR's extensions) is not consulted: the signer decides every field.
    pub fn sign(
        &self,
        identity: &SpiffeId,
        public_key: &impl PublicKeyData,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime), SignError> {
        if identity.trust_domain() != &self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.as_str().try_into().map_err(SignError::Mint)?,
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
        let not_after = (now + lifetime).min(self.not_after);
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        let certificate = params
            .signed_by(public_key, &self.issuer)
            .map_err(SignError::Mint)?;
        Ok((certificate.der().clone(), not_after))
    }
}

/// Why [`CertificateAuthority::sign`] signed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{identity} is not in trust domain {trust_domain}, the only one this CA signs for")]
    ForeignTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("minting a workload certificate: {0}")]
    Mint(rcgen::Error),
}

/// The roots one trust domain's certificates must chain to. More than one during a CA rotation:
/// the old root and the new one are both trusted until every certificate the old one signed has
/// expired.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Fails (with the reason) when `roots` is empty or holds a certificate that cannot be a
    /// trust anchor.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, String> {
        if roots.is_empty() {
            return Err("it holds no certificate".into());
        }
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|e| format!("certificate {}: {e}", index + 1))?;
        }
        Ok(TrustBundle {
            trust_domain,
            roots,
            store: Arc::new(store),
        })
    }

    /// Reads a PEM file of one or more roots; each must be a CA of `trust_domain`, valid at
    /// `now`.
    pub fn load(path: &Path, trust_domain: TrustDomain, now: SystemTime) -> Result<Self, CaError> {
        let invalid = |reason: String| CaError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let text = read(path)?;
        let roots = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
        for (index, root) in roots.iter().enumerate() {
            let root_domain = check_root(root, now)
                .map_err(|e| invalid(format!("certificate {}: {e}", index + 1)))?;
            if root_domain != trust_domain {
                return Err(invalid(format!(
                    "certificate {} is a root of trust domain {root_domain}, not {trust_domain}",
                    index + 1
                )));
            }
        }
        TrustBundle::new(trust_domain, roots).map_err(invalid)
    }

    /// Reads PEM roots from elsewhere than a file (Kubernetes mode's ConfigMap), each a CA valid
    /// at `now`; the trust domain is the roots' own (all must agree).
    pub fn from_pem(text: &str, now: SystemTime) -> Result<Self, String> {
        let roots = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        let mut trust_domain: Option<TrustDomain> = None;
        for (index, root) in roots.iter().enumerate() {
            let root_domain =
                check_root(root, now).map_err(|e| format!("certificate {}: {e}", index + 1))?;
            match &trust_domain {
                Some(domain) if *domain != root_domain => {
                    return Err(format!(
                        "certificate {} is a root of trust domain {root_domain}, not {domain}",
                        index + 1
                    ))
                }
                _ => trust_domain = Some(root_domain),
            }
        }
        let trust_domain = trust_domain.ok_or("it holds no certificate")?;
        TrustBundle::new(trust_domain, roots)
    }

    /// This bundle and one more root (a CA rotation's new root, or its old one).
    pub fn with_root(&self, root: CertificateDer<'static>) -> Result<Self, String> {
        let mut roots = self.roots.clone();
        roots.push(root);
        TrustBundle::new(self.trust_domain.clone(), roots)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as PEM, the format of `root-cert.pem`.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(pem).collect()
    }

    pub(super) fn root_store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists: refusing to overwrite a CA (every certificate it signed would stop being trusted)", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("minting the root certificate: {0}")]
    Mint(rcgen::Error),
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, mode: u32, contents: &[u8]) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    // create_new: a file that appeared since the check above is not overwritten either.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

fn pem(certificate: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", certificate.to_vec()))
}

fn only_certificate(path: &Path, text: &str) -> Result<CertificateDer<'static>, CaError> {
    let invalid = |reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut certificates = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    match certificates.len() {
        1 => Ok(certificates.remove(0)),
        n => Err(invalid(format!("it holds {n} certificates, not one"))),
    }
}

/// Checks that `certificate` can be a root of the mesh at `now`, and returns its trust domain.
fn check_root(certificate: &CertificateDer<'_>, now: SystemTime) -> Result<TrustDomain, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !parsed.is_ca() {
        return Err("it is not a CA certificate (basic constraints)".into());
    }
    if let Ok(Some(usage)) = parsed.key_usage() {
        if !usage.value.key_cert_sign() {
            return Err("its key usage does not allow signing certificates".into());
        }
    }
    check_validity(&parsed, now)?;
    let uris = uri_sans(&parsed)?;
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "it has {} URI SANs; a mesh root has one, spiffe://<trust-domain> \
             (`mesh-agent ca init` makes such roots)",
            uris.len()
        ));
    };
    uri.strip_prefix("spiffe://")
        .ok_or_else(|| format!("its URI SAN {uri:?} is not spiffe://<trust-domain>"))
        .and_then(|domain| TrustDomain::new(domain).map_err(|e| e.to_string()))
}

fn check_validity(parsed: &X509Certificate<'_>, now: SystemTime) -> Result<(), String> {
    let validity = parsed.validity();
    let now = time::OffsetDateTime::from(now);
    if now < validity.not_before.to_datetime() {
        return Err(format!("it is not valid before {}", validity.not_before));
    }
    if now > validity.not_after.to_datetime() {
        return Err(format!("it expired on {}", validity.not_after));
    }
    Ok(())
}

/// The URI SANs of a certificate.
pub(super) fn uri_sans(parsed: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let Some(sans) = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unreadable SAN extension: {e}"))?
    else {
        return Ok(Vec::new());
    };
    Ok(sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn init_writes_a_ca_that_loads_back() {
        let dir = dir();
        let ca_dir = dir.path().join("ca");
        let now = SystemTime::now();
        let made =
            CertificateAuthority::init(&ca_dir, "example.org".parse().unwrap(), now).unwrap();
        let mode = |file: &str| {
            fs::metadata(ca_dir.join(file))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        assert_eq!(
            fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let loaded = CertificateAuthority::load(&ca_dir, now + DAY).unwrap();
        assert_eq!(loaded.trust_domain().as_str(), "example.org");
        assert_eq!(loaded.certificate(), made.certificate());
        assert_eq!(loaded.trust_bundle().roots(), [made.certificate().clone()]);
        let validity = loaded.not_after().duration_since(now).unwrap();
        assert!(
            validity.abs_diff(ROOT_VALIDITY) < Duration::from_secs(2),
            "{validity:?}"
        );
        // The PEM this module writes is the PEM rustls reads.
        assert_eq!(
            fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap(),
            loaded.trust_bundle().to_pem()
        );
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca() {
        let dir = dir();
        CertificateAuthority::init(dir.path(), TrustDomain::default(), SystemTime::now()).unwrap();
        let key_before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let error =
            CertificateAuthority::init(dir.path(), TrustDomain::default(), SystemTime::now())
                .unwrap_err();
        assert!(matches!(error, CaError::Exists { .. }), "{error}");
        assert!(
            error.to_string().contains("refusing to overwrite"),
            "{error}"
        );
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), key_before);

        // One file of a CA is enough to refuse: the rest may be on its way back from a backup.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(ROOT_CERT_FILE), "").unwrap();
        let error =
            CertificateAuthority::init(other.path(), TrustDomain::default(), SystemTime::now())
                .unwrap_err();
        assert!(error.to_string().contains(ROOT_CERT_FILE), "{error}");
        assert!(!other.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn load_names_the_file_and_the_reason() {
        let now = SystemTime::now();
        let fresh = || {
            let dir = dir();
            CertificateAuthority::init(dir.path(), TrustDomain::default(), now).unwrap();
            dir
        };
        let error_of = |dir: &tempfile::TempDir, when: SystemTime| {
            CertificateAuthority::load(dir.path(), when)
                .unwrap_err()
                .to_string()
        };

        let missing = dir();
        assert!(error_of(&missing, now).contains(CA_KEY_FILE));

        let readable = fresh();
        fs::set_permissions(
            readable.path().join(CA_KEY_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let error = error_of(&readable, now);
        assert!(error.contains("ca-key.pem: mode 0644"), "{error}");

        let garbage_key = fresh();
        fs::write(garbage_key.path().join(CA_KEY_FILE), "not a key").unwrap();
        let error = error_of(&garbage_key, now);
        assert!(
            error.contains("ca-key.pem: not a PEM private key"),
            "{error}"
        );

        // Another CA's key beside this certificate.
        let mismatched = fresh();
        let other = fresh();
        fs::copy(
            other.path().join(CA_KEY_FILE),
            mismatched.path().join(CA_KEY_FILE),
        )
        .unwrap();
        let error = error_of(&mismatched, now);
        assert!(error.contains("does not match ca-cert.pem"), "{error}");

        let expired = fresh();
        let error = error_of(&expired, now + ROOT_VALIDITY + DAY);
        assert!(error.contains("ca-cert.pem: it expired on"), "{error}");

        let two = fresh();
        let cert = fs::read_to_string(two.path().join(CA_CERT_FILE)).unwrap();
        fs::write(two.path().join(CA_CERT_FILE), cert.repeat(2)).unwrap();
        let error = error_of(&two, now);
        assert!(
            error.contains("ca-cert.pem: it holds 2 certificates"),
            "{error}"
        );

        // A bundle without this CA's root: its workloads would be refused by every peer.
        let foreign_bundle = fresh();
        fs::copy(
            other.path().join(ROOT_CERT_FILE),
            foreign_bundle.path().join(ROOT_CERT_FILE),
        )
        .unwrap();
        let error = error_of(&foreign_bundle, now);
        assert!(error.contains("root-cert.pem: it does not hold"), "{error}");

        let empty_bundle = fresh();
        fs::write(empty_bundle.path().join(ROOT_CERT_FILE), "").unwrap();
        let error = error_of(&empty_bundle, now);
        assert!(
            error.contains("root-cert.pem: it holds no certificate"),
            "{error}"
        );
    }

    #[test]
    fn a_rotation_bundle_holds_the_old_root_and_the_new() {
        let now = SystemTime::now();
        let old = dir();
        let old_ca = CertificateAuthority::init(old.path(), TrustDomain::default(), now).unwrap();
        let new = dir();
        let new_ca = CertificateAuthority::init(new.path(), TrustDomain::default(), now).unwrap();
        // The operator's step: append the old root to the new CA's bundle.
        let bundle = new_ca
            .trust_bundle()
            .with_root(old_ca.certificate().clone())
            .unwrap();
        fs::write(new.path().join(ROOT_CERT_FILE), bundle.to_pem()).unwrap();
        let loaded = CertificateAuthority::load(new.path(), now).unwrap();
        assert_eq!(
            loaded.trust_bundle().roots(),
            [new_ca.certificate().clone(), old_ca.certificate().clone()]
        );
        assert_eq!(loaded.trust_bundle().root_store().len(), 2);

        // A root of another trust domain has no place in this bundle.
        let foreign = dir();
        let foreign_ca =
            CertificateAuthority::init(foreign.path(), "other.org".parse().unwrap(), now).unwrap();
        let mixed = bundle.with_root(foreign_ca.certificate().clone()).unwrap();
        fs::write(new.path().join(ROOT_CERT_FILE), mixed.to_pem()).unwrap();
        let error = CertificateAuthority::load(new.path(), now)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("certificate 3 is a root of trust domain other.org, not cluster.local"),
            "{error}"
        );
    }
}
