//! Handshakes in process over a duplex pipe: what the mesh's configs accept and what they refuse.
//! The refused peers are built by hand with rustls, as an attacker would, not with this module.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{pki_types::PrivateKeyDer, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::identity::{
    ca::CertificateAuthority,
    certificates::{CertificateSettings, ManualClock, WorkloadCertificate, DEFAULT_LIFETIME},
};

const HOUR: Duration = Duration::from_secs(3600);

struct Mesh {
    ca: Arc<CertificateAuthority>,
    clock: Arc<ManualClock>,
    store: Arc<CertificateStore>,
}

impl Mesh {
    fn new() -> Self {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(
            TrustDomain::default(),
            now - 100 * 24 * HOUR,
            365 * 24 * HOUR,
        )
        .unwrap();
        Mesh::with_ca(Arc::new(ca), now)
    }

    fn with_ca(ca: Arc<CertificateAuthority>, now: SystemTime) -> Self {
        let clock = Arc::new(ManualClock::new(now));
        let store = Arc::new(CertificateStore::new(
            ca.clone(),
            CertificateSettings::default(),
            clock.clone(),
        ));
        Mesh { ca, clock, store }
    }

    fn server(&self, identity: &SpiffeId) -> Arc<ServerConfig> {
        server_config(self.store.clone(), identity.clone()).unwrap()
    }

    fn client(&self, identity: &SpiffeId, expected: &SpiffeId) -> Arc<ClientConfig> {
        client_config(self.store.clone(), identity.clone(), expected.clone()).unwrap()
    }

    /// A certificate of this mesh's CA, as `issue` makes them.
    fn certificate(&self, identity: &SpiffeId, now: SystemTime) -> Arc<CertifiedKey> {
        WorkloadCertificate::issue(&self.ca, identity, now, DEFAULT_LIFETIME)
            .unwrap()
            .certified_key()
            .clone()
    }

    /// A leaf signed by this mesh's CA with the SANs given: what `issue` refuses to make.
    fn certificate_with_sans(&self, sans: Vec<SanType>) -> Arc<CertifiedKey> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, self.ca.issuer()).unwrap();
        Arc::new(
            CertifiedKey::from_der(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                &ring::default_provider(),
            )
            .unwrap(),
        )
    }
}

fn id(service_account: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::default(), "shop", service_account).unwrap()
}

fn destination() -> ServerName<'static> {
    ServerName::IpAddress(Ipv4Addr::new(10, 0, 2, 7).into())
}

type Client = Result<(tokio_rustls::client::TlsStream<DuplexStream>, SpiffeId), HandshakeError>;
type Server = Result<(tokio_rustls::server::TlsStream<DuplexStream>, SpiffeId), HandshakeError>;

async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> (Client, Server) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    tokio::join!(connect(client, destination(), a), accept(server, b))
}

/// Bytes make it both ways through an established pair.
async fn exchange(
    client: &mut tokio_rustls::client::TlsStream<DuplexStream>,
    server: &mut tokio_rustls::server::TlsStream<DuplexStream>,
) {
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

/// Presents a fixed certificate: the attacker's side.
#[derive(Debug)]
struct Fixed(Option<Arc<CertifiedKey>>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

/// An attacker's client trusts any server: it only wants in.
#[derive(Debug)]
struct TrustAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn attacker_client(
    certificate: Option<Arc<CertifiedKey>>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything(provider())))
        .with_client_cert_resolver(Arc::new(Fixed(certificate)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

fn attacker_server(certificate: Arc<CertifiedKey>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Some(certificate))));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn a_valid_pair_connects_and_each_side_sees_the_others_identity() {
    let mesh = Mesh::new();
    let (client, server) = handshake(
        mesh.client(&id("frontend"), &id("reviews")),
        mesh.server(&id("reviews")),
    )
    .await;
    let (mut client, server_identity) = client.unwrap();
    let (mut server, client_identity) = server.unwrap();
    assert_eq!(server_identity, id("reviews"));
    assert_eq!(client_identity, id("frontend"));
    let connection = client.get_ref().1;
    assert_eq!(
        connection.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(connection.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(peer_identity(server.get_ref().1).unwrap(), id("frontend"));
    exchange(&mut client, &mut server).await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let mesh = Mesh::new();
    // Same trust domain, same identity, same shape: only the signature gives it away.
    let forger = Mesh::new();
    let forged = forger.certificate(&id("frontend"), SystemTime::now());
    let (client, server) = handshake(
        attacker_client(Some(forged), &[&rustls::version::TLS13]),
        mesh.server(&id("reviews")),
    )
    .await;
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::Untrusted(_)), "{error}");
    assert_eq!(error.reason(), "untrusted");
    // The client finished first (TLS 1.3); the refusal reaches it on its first read.
    let (mut client, _) = client.unwrap();
    let mut buf = [0; 1];
    let read = client.read(&mut buf).await.unwrap_err();
    let error = HandshakeError::from_io(read);
    assert!(matches!(error, HandshakeError::Refused(_)), "{error}");
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let mesh = Mesh::new();
    let forger = Mesh::new();
    let forged = forger.certificate(&id("reviews"), SystemTime::now());
    let (client, _) = handshake(
        mesh.client(&id("frontend"), &id("reviews")),
        attacker_server(forged),
    )
    .await;
    let error = client.unwrap_err();
    assert!(matches!(error, HandshakeError::Untrusted(_)), "{error}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_either_way() {
    let mesh = Mesh::new();
    let yesterday = SystemTime::now() - 2 * DEFAULT_LIFETIME;
    let expired = mesh.certificate(&id("frontend"), yesterday);
    let (_, server) = handshake(
        attacker_client(Some(expired.clone()), &[&rustls::version::TLS13]),
        mesh.server(&id("reviews")),
    )
    .await;
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::Expired(_)), "{error}");
    assert_eq!(error.reason(), "expired");

    let expired = mesh.certificate(&id("reviews"), yesterday);
    let (client, _) = handshake(
        mesh.client(&id("frontend"), &id("reviews")),
        attacker_server(expired),
    )
    .await;
    let error = client.unwrap_err();
    assert!(matches!(error, HandshakeError::Expired(_)), "{error}");
}

#[tokio::test]
async fn a_server_naming_another_identity_is_refused() {
    let mesh = Mesh::new();
    // A genuine workload of the mesh, but not the one this connection is for.
    let (client, _) = handshake(
        mesh.client(&id("frontend"), &id("reviews")),
        mesh.server(&id("ratings")),
    )
    .await;
    let error = client.unwrap_err();
    assert_eq!(error.reason(), "wrong_identity");
    let HandshakeError::WrongIdentity(PeerIdentityError::Unexpected {
        expected,
        presented,
    }) = error
    else {
        panic!("{error}");
    };
    assert_eq!((expected, presented), (id("reviews"), id("ratings")));
}

#[tokio::test]
async fn a_client_certificate_naming_no_identity_of_the_trust_domain_is_refused() {
    let mesh = Mesh::new();
    let foreign = mesh.certificate_with_sans(vec![SanType::URI(
        "spiffe://other.org/ns/shop/sa/frontend".try_into().unwrap(),
    )]);
    let dns_only = mesh.certificate_with_sans(vec![SanType::DnsName(
        "frontend.shop.svc.cluster.local".try_into().unwrap(),
    )]);
    let not_spiffe = mesh.certificate_with_sans(vec![SanType::URI(
        "spiffe://cluster.local/frontend".try_into().unwrap(),
    )]);
    type IsExpected = fn(&PeerIdentityError) -> bool;
    let expected: [(Arc<CertifiedKey>, IsExpected); 3] = [
        (foreign, |e| {
            matches!(e, PeerIdentityError::ForeignTrustDomain { .. })
        }),
        (dns_only, |e| matches!(e, PeerIdentityError::UriSanCount(0))),
        (not_spiffe, |e| matches!(e, PeerIdentityError::NotSpiffe(_))),
    ];
    for (certificate, is_expected) in expected {
        let (_, server) = handshake(
            attacker_client(Some(certificate), &[&rustls::version::TLS13]),
            mesh.server(&id("reviews")),
        )
        .await;
        match server.unwrap_err() {
            HandshakeError::WrongIdentity(error) if is_expected(&error) => {}
            other => panic!("{other}"),
        }
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let mesh = Mesh::new();
    let (_, server) = handshake(
        attacker_client(None, &[&rustls::version::TLS13]),
        mesh.server(&id("reviews")),
    )
    .await;
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::NoCertificate), "{error}");
}

#[tokio::test]
async fn a_plain_tcp_client_is_refused() {
    let mesh = Mesh::new();
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let plaintext = async {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            .await
            .unwrap();
        client
    };
    let (_client, server) = tokio::join!(plaintext, accept(mesh.server(&id("reviews")), server));
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::NotTls(_)), "{error}");
    assert_eq!(error.reason(), "not_tls");
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() {
    let mesh = Mesh::new();
    // A genuine certificate: only the protocol version is wrong.
    let genuine = mesh.certificate(&id("frontend"), SystemTime::now());
    let (client, server) = handshake(
        attacker_client(Some(genuine), &[&rustls::version::TLS12]),
        mesh.server(&id("reviews")),
    )
    .await;
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::Incompatible(_)), "{error}");
    assert!(client.is_err());
}

#[tokio::test]
async fn a_client_offering_no_alpn_is_refused() {
    let mesh = Mesh::new();
    let genuine = mesh.certificate(&id("frontend"), SystemTime::now());
    let mut client =
        Arc::unwrap_or_clone(attacker_client(Some(genuine), &[&rustls::version::TLS13]));
    client.alpn_protocols.clear();
    let (_, server) = handshake(Arc::new(client), mesh.server(&id("reviews"))).await;
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::NoAlpn), "{error}");
    assert_eq!(error.reason(), "incompatible");
}

#[tokio::test]
async fn renewal_gives_new_connections_a_new_certificate_and_leaves_old_ones_working() {
    let mesh = Mesh::new();
    let client = mesh.client(&id("frontend"), &id("reviews"));
    let server = mesh.server(&id("reviews"));
    let (old_client, old_server) = handshake(client.clone(), server.clone()).await;
    let (mut old_client, _) = old_client.unwrap();
    let (mut old_server, _) = old_server.unwrap();

    mesh.clock.advance(DEFAULT_LIFETIME / 2 + HOUR);
    let (new_client, new_server) = handshake(client, server).await;
    let (mut new_client, seen) = new_client.unwrap();
    let (mut new_server, _) = new_server.unwrap();
    assert_eq!(seen, id("reviews"));
    let presented = |connection: &CommonState| connection.peer_certificates().unwrap()[0].clone();
    assert_ne!(
        presented(old_server.get_ref().1),
        presented(new_server.get_ref().1),
        "the client presents its renewed certificate"
    );
    assert_ne!(
        presented(old_client.get_ref().1),
        presented(new_client.get_ref().1),
        "the server presents its renewed certificate"
    );
    exchange(&mut old_client, &mut old_server).await;
    exchange(&mut new_client, &mut new_server).await;
}

#[tokio::test]
async fn both_roots_of_a_rotation_bundle_are_trusted() {
    let now = SystemTime::now();
    let (old_dir, new_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let old = CertificateAuthority::init(old_dir.path(), TrustDomain::default(), now).unwrap();
    let new = CertificateAuthority::init(new_dir.path(), TrustDomain::default(), now).unwrap();
    let new_only = Mesh::with_ca(Arc::new(new), now);
    let both = new_only
        .ca
        .trust_bundle()
        .with_root(old.certificate().clone())
        .unwrap();
    for dir in [&old_dir, &new_dir] {
        std::fs::write(
            dir.path().join(crate::identity::ca::ROOT_CERT_FILE),
            both.to_pem(),
        )
        .unwrap();
    }
    let old = Mesh::with_ca(
        Arc::new(CertificateAuthority::load(old_dir.path(), now).unwrap()),
        now,
    );
    let new = Mesh::with_ca(
        Arc::new(CertificateAuthority::load(new_dir.path(), now).unwrap()),
        now,
    );
    let (client, server) = handshake(
        old.client(&id("frontend"), &id("reviews")),
        new.server(&id("reviews")),
    )
    .await;
    assert_eq!(client.unwrap().1, id("reviews"));
    assert_eq!(server.unwrap().1, id("frontend"));
    let (client, server) = handshake(
        new.client(&id("frontend"), &id("reviews")),
        old.server(&id("reviews")),
    )
    .await;
    assert_eq!(client.unwrap().1, id("reviews"));
    assert_eq!(server.unwrap().1, id("frontend"));

    // The control: a server trusting the new root alone refuses the old root's workloads.
    let (_, server) = handshake(
        old.client(&id("frontend"), &id("reviews")),
        new_only.server(&id("reviews")),
    )
    .await;
    let error = server.unwrap_err();
    assert!(matches!(error, HandshakeError::Untrusted(_)), "{error}");
}
