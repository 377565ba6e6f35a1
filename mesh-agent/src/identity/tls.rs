//! Mutual TLS between agents: TLS 1.3 only, ALPN `h2`, a certificate required of both sides,
//! each chained to the trust bundle and naming the SPIFFE identity expected of it.
//!
//! Session resumption is off on both sides: a resumed session skips the certificate checks, and
//! a destination's identity (or a certificate's expiry) may have changed since the ticket.

use std::{fmt, io, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert, Resumption,
    },
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    time_provider::TimeProvider,
    AlertDescription, CertificateError as RustlsCertificateError, ClientConfig, CommonState,
    DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    ca::uri_sans,
    certificates::{CertificateStore, Clock},
    spiffe::{SpiffeId, TrustDomain},
};

/// The only application protocol spoken inside the tunnel: HTTP/2 (HBONE's CONNECT).
pub const ALPN_H2: &[u8] = b"h2";

/// The server side of the mesh's mutual TLS, presenting `identity`'s current certificate from
/// `store` (each handshake asks the store, so renewals apply to new connections only) and
/// accepting a client of any identity of the bundle's trust domain. [`accept`] returns which.
pub fn server_config(
    store: Arc<CertificateStore>,
    identity: SpiffeId,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let bundle = store.trust_bundle().clone();
    let time = Arc::new(ClockTime(store.clock().clone()));
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(bundle.root_store(), provider.clone())
            .build()
            .map_err(|e| TlsConfigError(e.to_string()))?;
    let mut config = ServerConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError(e.to_string()))?
        .with_client_cert_verifier(Arc::new(TrustDomainClientVerifier {
            inner: client_verifier,
            trust_domain: bundle.trust_domain().clone(),
        }))
        .with_cert_resolver(Arc::new(CurrentCertificate { store, identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side, presenting `identity`'s current certificate and accepting only a server
/// whose certificate chains to the bundle and names `expected_peer`. The `ServerName` given to
/// [`connect`] is not checked against the certificate (mesh certificates carry no DNS names):
/// pass the destination's IP address, which also keeps SNI off the wire.
pub fn client_config(
    store: Arc<CertificateStore>,
    identity: SpiffeId,
    expected_peer: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let time = Arc::new(ClockTime(store.clock().clone()));
    let verifier = SpiffeServerVerifier {
        roots: store.trust_bundle().root_store(),
        expected: expected_peer,
        provider: provider.clone(),
    };
    let mut config = ClientConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentCertificate { store, identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Completes the server side of a handshake; returns the stream and the client's verified
/// identity.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
) -> Result<(tokio_rustls::server::TlsStream<IO>, SpiffeId), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(HandshakeError::from_io)?;
    let peer = checked_peer(stream.get_ref().1)?;
    Ok((stream, peer))
}

/// Completes the client side of a handshake; returns the stream and the server's verified
/// identity (the one the config expects). In TLS 1.3 the client finishes first: a server that
/// refuses this client's certificate shows as an error on the stream's first read.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    io: IO,
) -> Result<(tokio_rustls::client::TlsStream<IO>, SpiffeId), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, io)
        .await
        .map_err(HandshakeError::from_io)?;
    let peer = checked_peer(stream.get_ref().1)?;
    Ok((stream, peer))
}

/// The SPIFFE identity of a connection's peer, from its (already verified) certificate.
pub fn peer_identity(connection: &CommonState) -> Result<SpiffeId, PeerIdentityError> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(PeerIdentityError::NoCertificate)?;
    spiffe_id_of(leaf)
}

fn checked_peer(connection: &CommonState) -> Result<SpiffeId, HandshakeError> {
    if connection.alpn_protocol() != Some(ALPN_H2) {
        return Err(HandshakeError::NoAlpn);
    }
    peer_identity(connection).map_err(HandshakeError::WrongIdentity)
}

/// The SPIFFE ID a certificate names: its one URI SAN (the X509-SVID rule).
pub fn spiffe_id_of(certificate: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|e| PeerIdentityError::Unreadable(e.to_string()))?;
    let uris = uri_sans(&parsed).map_err(PeerIdentityError::Unreadable)?;
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(PeerIdentityError::NotSpiffe),
        _ => Err(PeerIdentityError::UriSanCount(uris.len())),
    }
}

/// Why a peer's certificate, although it chains to the bundle, is not the peer wanted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate is unreadable: {0}")]
    Unreadable(String),
    #[error(
        "the peer's certificate has {0} URI SANs, not the one SPIFFE ID a mesh certificate has"
    )]
    UriSanCount(usize),
    #[error("the peer's certificate does not name a workload: {0}")]
    NotSpiffe(super::spiffe::SpiffeIdError),
    #[error("the peer is {presented}, not {expected}")]
    Unexpected {
        expected: SpiffeId,
        presented: SpiffeId,
    },
    #[error("the peer is {presented}, outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        trust_domain: TrustDomain,
        presented: SpiffeId,
    },
}

/// Why a handshake failed, sorted for counting ([`HandshakeError::reason`]).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's chain leads to no root of the bundle: forged, or another mesh's.
    #[error("the peer's certificate is not signed by a trusted root: {0}")]
    Untrusted(rustls::Error),
    /// The peer's certificate has expired (or is not valid yet).
    #[error("the peer's certificate is outside its validity: {0}")]
    Expired(rustls::Error),
    /// Chained to the bundle, but not the identity expected (or not an identity at all).
    #[error(transparent)]
    WrongIdentity(PeerIdentityError),
    /// Any other fault of the peer's certificate (wrong key usage, say).
    #[error("the peer's certificate is invalid: {0}")]
    BadCertificate(rustls::Error),
    /// A client that sent no certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The peer refused this side (its own verification failed, most often).
    #[error("the peer refused the handshake: {0:?}")]
    Refused(AlertDescription),
    /// The peer speaks TLS, but not TLS 1.3 with ALPN h2.
    #[error("the peer cannot speak TLS 1.3 with ALPN h2: {0}")]
    Incompatible(rustls::Error),
    /// The handshake ended without ALPN: the peer offered none.
    #[error("the peer did not negotiate ALPN h2")]
    NoAlpn,
    /// The peer does not speak TLS at all (a plain TCP client, say).
    #[error("the peer does not speak TLS: {0}")]
    NotTls(rustls::Error),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("I/O during the handshake: {0}")]
    Io(io::Error),
}

impl HandshakeError {
    /// A short, fixed label for a metric.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Untrusted(_) => "untrusted",
            HandshakeError::Expired(_) => "expired",
            HandshakeError::WrongIdentity(_) => "wrong_identity",
            HandshakeError::BadCertificate(_) => "bad_certificate",
            HandshakeError::NoCertificate => "no_certificate",
            HandshakeError::Refused(_) => "refused_by_peer",
            HandshakeError::Incompatible(_) | HandshakeError::NoAlpn => "incompatible",
            HandshakeError::NotTls(_) => "not_tls",
            HandshakeError::Tls(_) => "tls",
            HandshakeError::Io(_) => "io",
        }
    }

    /// Sorts an error of a handshake or of a first read (where a TLS 1.3 client learns that the
    /// server refused its certificate) from a tokio-rustls stream.
    pub fn from_io(error: io::Error) -> Self {
        // tokio-rustls wraps rustls's error in an io::Error of kind InvalidData.
        if error.get_ref().is_some_and(|e| e.is::<rustls::Error>()) {
            let inner = error.into_inner().expect("checked above");
            return HandshakeError::from(*inner.downcast::<rustls::Error>().expect("checked"));
        }
        HandshakeError::Io(error)
    }
}

impl From<rustls::Error> for HandshakeError {
    fn from(error: rustls::Error) -> Self {
        use rustls::Error as E;
        use RustlsCertificateError as C;
        match error {
            E::InvalidCertificate(ref certificate) => match certificate {
                C::UnknownIssuer
                | C::BadSignature
                | C::UnsupportedSignatureAlgorithmContext { .. } => {
                    HandshakeError::Untrusted(error)
                }
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => HandshakeError::Expired(error),
                C::Other(OtherError(inner)) => match inner.downcast_ref::<PeerIdentityError>() {
                    Some(identity) => HandshakeError::WrongIdentity(identity.clone()),
                    None => HandshakeError::BadCertificate(error),
                },
                _ => HandshakeError::BadCertificate(error),
            },
            E::NoCertificatesPresented => HandshakeError::NoCertificate,
            E::AlertReceived(alert) => HandshakeError::Refused(alert),
            E::PeerIncompatible(_) | E::NoApplicationProtocol => {
                HandshakeError::Incompatible(error)
            }
            E::InvalidMessage(_) => HandshakeError::NotTls(error),
            _ => HandshakeError::Tls(error),
        }
    }
}

/// A TLS config could not be built (a bug, or a bundle rustls refuses).
#[derive(Debug, thiserror::Error)]
#[error("building the mesh's TLS config: {0}")]
pub struct TlsConfigError(String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn identity_error(error: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(RustlsCertificateError::Other(OtherError(Arc::new(error))))
}

/// rustls's time is the store's clock, so that certificates minted and checked in a test agree
/// on what "now" is.
#[derive(Debug)]
struct ClockTime(Arc<dyn Clock>);

impl TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(
            self.0.now().duration_since(std::time::UNIX_EPOCH).ok()?,
        ))
    }
}

/// Presents the current certificate of one identity, asking the store at each handshake.
#[derive(Debug)]
struct CurrentCertificate {
    store: Arc<CertificateStore>,
    identity: SpiffeId,
}

impl CurrentCertificate {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self.store.certificate(&self.identity) {
            Ok(certificate) => Some(certificate.certified_key().clone()),
            Err(error) => {
                // rustls has no way to carry the error; the handshake fails for want of a
                // certificate. Callers who count call `CertificateStore::certificate` first.
                tracing::warn!(identity = %self.identity, %error, "no certificate to present");
                None
            }
        }
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server is trusted when its chain leads to the bundle and its certificate names exactly the
/// identity the destination is expected to have. DNS names play no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = spiffe_id_of(end_entity).map_err(identity_error)?;
        if presented != self.expected {
            return Err(identity_error(PeerIdentityError::Unexpected {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client is trusted when rustls's own verifier accepts its chain (to the bundle, with the
/// clientAuth usage) and its certificate names an identity of the trust domain.
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl fmt::Debug for TrustDomainClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustDomainClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = spiffe_id_of(end_entity).map_err(identity_error)?;
        if *presented.trust_domain() != self.trust_domain {
            return Err(identity_error(PeerIdentityError::ForeignTrustDomain {
                trust_domain: self.trust_domain.clone(),
                presented,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests;
