//! The control plane's credentials, made fresh for each start: a CA, the API server's serving
//! certificate, the service-account signing key, static tokens for the admin and the two
//! controllers, and their kubeconfigs.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// The first address of the service range, which the API server gives the `kubernetes` Service;
/// its certificate names it as in-cluster clients reach it.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Who uses the API server with a static token, and as whom RBAC sees them.
#[derive(Clone, Copy)]
pub(crate) enum Identity {
    /// `system:masters`: everything, like kubeadm's admin.conf.
    Admin,
    /// The user the bootstrap RBAC policy grants the controller-manager's own permissions.
    ControllerManager,
    /// The user the bootstrap RBAC policy grants the scheduler's permissions.
    Scheduler,
}

impl Identity {
    const ALL: [Self; 3] = [Self::Admin, Self::ControllerManager, Self::Scheduler];

    fn user(self) -> &'static str {
        match self {
            Self::Admin => "mesh-admin",
            Self::ControllerManager => "system:kube-controller-manager",
            Self::Scheduler => "system:kube-scheduler",
        }
    }

    fn groups(self) -> &'static str {
        match self {
            Self::Admin => "system:masters",
            Self::ControllerManager | Self::Scheduler => "",
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ControllerManager => "controller-manager",
            Self::Scheduler => "scheduler",
        }
    }
}

/// Paths of what [`write`] made, all inside one directory.
pub(crate) struct Credentials {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// The service-account signing key (PKCS#8 PEM): the API server signs TokenRequest tokens
    /// with it, the controller-manager's token controller the legacy token Secrets.
    pub service_account_key: PathBuf,
    /// Its public half (SPKI PEM), which the API server verifies tokens with (1.20 reads only
    /// public keys there).
    pub service_account_public_key: PathBuf,
    /// `token,user,uid,"groups"` lines for `--token-auth-file`.
    pub token_file: PathBuf,
    pub admin_token: String,
    tokens: Vec<(String, Identity)>,
}

impl Credentials {
    /// A kubeconfig for `identity` against `server`, written to `dir/<identity>.kubeconfig`.
    pub fn kubeconfig(&self, dir: &Path, server: &str, identity: Identity) -> Result<PathBuf> {
        let token = self
            .tokens
            .iter()
            .find(|(_, who)| who.file_stem() == identity.file_stem())
            .map(|(token, _)| token)
            .context("no token for this identity")?;
        let path = kubeconfig_path(dir, identity);
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: mesh-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n\
             - name: {user}\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: mesh-test\n  context:\n    cluster: mesh-test\n    user: {user}\n\
             current-context: mesh-test\n",
            ca = self.ca_cert.display(),
            user = identity.user(),
        );
        write_private(&path, &text)?;
        Ok(path)
    }
}

/// Where [`Credentials::kubeconfig`] writes `identity`'s kubeconfig.
pub(crate) fn kubeconfig_path(dir: &Path, identity: Identity) -> PathBuf {
    dir.join(format!("{}.kubeconfig", identity.file_stem()))
}

/// Makes a CA, a serving certificate for the API server on `127.0.0.1` and `address` (and the
/// names in-cluster clients use), the service-account key and the tokens, in `dir`.
pub(crate) fn write(dir: &Path, address: Ipv4Addr) -> Result<Credentials> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mesh test cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    let mut addresses = vec![Ipv4Addr::LOCALHOST, KUBERNETES_SERVICE_IP];
    if !addresses.contains(&address) {
        addresses.push(address);
    }
    for ip in addresses {
        serving
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(IpAddr::V4(ip)));
    }
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &ca)?;

    let service_account_key = KeyPair::generate()?;
    let tokens: Vec<(String, Identity)> = Identity::ALL
        .iter()
        .map(|identity| Ok((random_token()?, *identity)))
        .collect::<Result<_>>()?;
    let credentials = Credentials {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        service_account_key: dir.join("service-account.key"),
        service_account_public_key: dir.join("service-account.pub"),
        token_file: dir.join("tokens.csv"),
        admin_token: tokens
            .iter()
            .find(|(_, identity)| matches!(identity, Identity::Admin))
            .map(|(token, _)| token.clone())
            .context("no admin token")?,
        tokens,
    };
    fs::write(&credentials.ca_cert, ca_cert.pem())?;
    fs::write(&credentials.serving_cert, serving_cert.pem())?;
    write_private(&credentials.serving_key, &serving_key.serialize_pem())?;
    write_private(
        &credentials.service_account_key,
        &service_account_key.serialize_pem(),
    )?;
    fs::write(
        &credentials.service_account_public_key,
        service_account_key.public_key_pem(),
    )?;
    let mut lines = String::new();
    for (uid, (token, identity)) in credentials.tokens.iter().enumerate() {
        let _ = writeln!(
            lines,
            "{token},{},{uid},\"{}\"",
            identity.user(),
            identity.groups()
        );
    }
    write_private(&credentials.token_file, &lines)?;
    Ok(credentials)
}

/// 32 random bytes from the kernel, hex-encoded.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    }))
}

/// Writes a file only its owner can read (keys, tokens).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
