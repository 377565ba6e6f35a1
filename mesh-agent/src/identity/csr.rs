//! Kubernetes mode's issuer: the agent asks for each workload certificate with a
//! CertificateSigningRequest (`certificates.k8s.io/v1`) of our [`SIGNER_NAME`], which the signer
//! (`mesh-agent ca serve`, [`super::signer`]) approves and signs only for the pods of the
//! agent's own node. The key never leaves the agent (made in memory, only its public half in the
//! request); the CSR is deleted once answered. The trust bundle comes from the signer's
//! ConfigMap.
//!
//! The agent must create its CSRs with a pod-bound ServiceAccount token (the DaemonSet's
//! projected token, [`DEFAULT_TOKEN_FILE`]): the signer ties the request to the pod that token
//! names, and through it to the node.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use k8s_openapi::{
    api::{
        certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
        core::v1::ConfigMap,
    },
    ByteString,
};
use kube::{
    api::{DeleteParams, ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::pki_types::{pem::PemObject, CertificateDer};

use super::{
    ca::TrustBundle,
    certificates::{
        CertificateError, CertificateSettings, CertificateStore, Clock, IssueFuture, Issued, Issuer,
    },
    signer::{BUNDLE_CONFIGMAP, BUNDLE_KEY, SIGNER_NAME, USAGES},
    spiffe::SpiffeId,
    tls::spiffe_id_of,
};

/// Where the DaemonSet mounts the agent's pod-bound token (a projected `serviceAccountToken`
/// volume: the kubelet binds it to the pod and renews it).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/sidecarless.io/serviceaccount/token";

/// How long an agent waits for the signer to answer one CSR.
pub const DEFAULT_ISSUE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest pause between two looks at a pending CSR (the first looks come sooner: a signer
/// that is up answers in tens of milliseconds).
const MAX_POLL: Duration = Duration::from_millis(500);

/// An API client from `kubeconfig` (or in-cluster, `$KUBECONFIG`, `~/.kube/config`), using
/// `token_file` as its credentials when given (re-read as the kubelet renews it).
pub async fn kube_client(
    kubeconfig: Option<&Path>,
    token_file: Option<&Path>,
) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    if let Some(token_file) = token_file {
        anyhow::ensure!(
            token_file.exists(),
            "the pod-bound token {} does not exist (the DaemonSet's projected token volume)",
            token_file.display()
        );
        config.auth_info = kube::config::AuthInfo {
            token_file: Some(token_file.display().to_string()),
            ..Default::default()
        };
    }
    Ok(Client::try_from(config)?)
}

/// Kubernetes mode's identity settings of an agent.
#[derive(Clone, Debug)]
pub struct KubernetesIdentity {
    /// The agents' namespace, where the signer publishes the trust bundle.
    pub agent_namespace: String,
    /// This node's name: in CSR names, so that `kubectl get csr` shows who asked.
    pub node_name: String,
    /// How long one CSR may wait for its answer.
    pub timeout: Duration,
}

/// Asks the signer for certificates through the CSR API.
#[derive(Debug)]
pub struct CsrIssuer {
    csrs: Api<CertificateSigningRequest>,
    bundle: TrustBundle,
    name_prefix: String,
    timeout: Duration,
}

impl CsrIssuer {
    /// Reads the trust bundle the signer published; fails if it is not there in time.
    /// Waits up to the identity's timeout for it: the signer and the agents start together on a
    /// fresh install.
    pub async fn new(client: Client, identity: &KubernetesIdentity) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + identity.timeout;
        let bundle = loop {
            match read_bundle(&client, &identity.agent_namespace).await {
                Ok(bundle) => break bundle,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(error = format!("{error:#}"), "waiting for the trust bundle");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error),
            }
        };
        Ok(CsrIssuer {
            csrs: Api::all(client),
            bundle,
            name_prefix: csr_name_prefix(&identity.node_name),
            timeout: identity.timeout,
        })
    }

    async fn request(
        &self,
        identity: &SpiffeId,
        key: &KeyPair,
        lifetime: Duration,
    ) -> Result<Issued, CertificateError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .as_str()
                .try_into()
                .map_err(CertificateError::Mint)?,
        )];
        let request = params
            .serialize_request(key)
            .and_then(|request| request.pem())
            .map_err(CertificateError::Mint)?;
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some(self.name_prefix.clone()),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(request.into_bytes()),
                signer_name: SIGNER_NAME.to_owned(),
                usages: Some(USAGES.iter().map(|usage| usage.to_string()).collect()),
                // Honoured from Kubernetes 1.22 on (ignored before); the signer decides anyway.
                expiration_seconds: i32::try_from(lifetime.as_secs()).ok(),
                ..Default::default()
            },
            status: None,
        };
        let created = self
            .csrs
            .create(&PostParams::default(), &csr)
            .await
            .map_err(|e| issuer_error(format!("creating a CSR for {identity}: {e}")))?;
        let name = created.metadata.name.unwrap_or_default();
        let answer = tokio::time::timeout(self.timeout, self.answer(&name)).await;
        // Answered, refused or abandoned, it has served: it would otherwise stay an hour, until
        // the controller-manager's CSR cleaner.
        if let Err(error) = self.csrs.delete(&name, &DeleteParams::default()).await {
            tracing::debug!(csr = %name, %error, "deleting an answered CSR failed");
        }
        let pem = match answer {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(issuer_error(format!(
                    "the signer did not answer CSR {name} for {identity} within {:?} (is \
                     `mesh-agent ca serve` running?)",
                    self.timeout
                )))
            }
        };
        check_answer(&self.bundle, identity, key, &name, &pem)
    }

    /// Waits for the CSR's certificate, or its denial.
    async fn answer(&self, name: &str) -> Result<Vec<u8>, CertificateError> {
        let mut pause = Duration::from_millis(10);
        loop {
            let csr = self
                .csrs
                .get(name)
                .await
                .map_err(|e| issuer_error(format!("reading CSR {name}: {e}")))?;
            let status = csr.status.unwrap_or_default();
            if let Some(refusal) = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
            {
                return Err(issuer_error(format!(
                    "CSR {name} {}: {}: {}",
                    refusal.type_.to_lowercase(),
                    refusal.reason.as_deref().unwrap_or("no reason"),
                    refusal.message.as_deref().unwrap_or_default()
                )));
            }
            if let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) {
                return Ok(certificate.0);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

impl Issuer for CsrIssuer {
    fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    fn issue<'a>(
        &'a self,
        identity: &'a SpiffeId,
        key: &'a KeyPair,
        _now: SystemTime,
        lifetime: Duration,
    ) -> IssueFuture<'a> {
        Box::pin(self.request(identity, key, lifetime))
    }
}

/// The signer's answer to CSR `name` must be a chain for this key and identity, issued by a root
/// of the bundle: a signer that answers with anything else is not believed.
fn check_answer(
    bundle: &TrustBundle,
    identity: &SpiffeId,
    key: &KeyPair,
    name: &str,
    pem: &[u8],
) -> Result<Issued, CertificateError> {
    let bad = |what: String| issuer_error(format!("CSR {name}'s certificate {what}"));
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("is not PEM: {e}")))?;
    let leaf = chain.first().ok_or_else(|| bad("is empty".into()))?;
    let named = spiffe_id_of(leaf).map_err(|e| bad(e.to_string()))?;
    if &named != identity {
        return Err(bad(format!("names {named}, not {identity}")));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("is not for the key this agent made".into()));
    }
    let from_a_root = bundle.roots().iter().any(|root| {
        x509_parser::parse_x509_certificate(root).is_ok_and(|(_, root)| {
            root.subject().as_raw() == parsed.issuer().as_raw()
                && parsed.verify_signature(Some(root.public_key())).is_ok()
        })
    });
    if !from_a_root {
        return Err(bad("is not signed by a root of the trust bundle".into()));
    }
    let not_after = parsed.validity().not_after.to_datetime().into();
    Ok(Issued { chain, not_after })
}

/// Reads the trust bundle from the signer's ConfigMap.
pub async fn read_bundle(client: &Client, namespace: &str) -> anyhow::Result<TrustBundle> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = maps
        .get_opt(BUNDLE_CONFIGMAP)
        .await
        .with_context(|| format!("reading ConfigMap {namespace}/{BUNDLE_CONFIGMAP}"))?
        .with_context(|| {
            format!(
                "no ConfigMap {namespace}/{BUNDLE_CONFIGMAP}, the trust bundle: the signer \
                 (`mesh-agent ca serve`) publishes it when it starts"
            )
        })?;
    let pem = map
        .data
        .unwrap_or_default()
        .remove(BUNDLE_KEY)
        .with_context(|| format!("ConfigMap {namespace}/{BUNDLE_CONFIGMAP} has no {BUNDLE_KEY}"))?;
    TrustBundle::from_pem(&pem, SystemTime::now())
        .map_err(|reason| anyhow::anyhow!("{namespace}/{BUNDLE_CONFIGMAP}: {reason}"))
}

/// The certificate store of an agent in Kubernetes mode: certificates from the signer through
/// CSRs made with `client` (which must carry the agent's pod-bound token, see [`kube_client`]),
/// renewed in the background from half life. Call within the agent's tokio runtime.
pub async fn kubernetes_store(
    client: Client,
    identity: &KubernetesIdentity,
    settings: CertificateSettings,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<CertificateStore>> {
    let issuer = CsrIssuer::new(client, identity).await?;
    Ok(CertificateStore::remote(Arc::new(issuer), settings, clock))
}

/// What the agent's run calls in Kubernetes mode: a client with the pod-bound token
/// `token_file` ([`DEFAULT_TOKEN_FILE`] in the DaemonSet), then [`kubernetes_store`] with the
/// default settings and the system clock.
pub async fn agent_store(
    kubeconfig: Option<&Path>,
    token_file: &Path,
    identity: &KubernetesIdentity,
) -> anyhow::Result<Arc<CertificateStore>> {
    let client = kube_client(kubeconfig, Some(token_file)).await?;
    kubernetes_store(
        client,
        identity,
        CertificateSettings::default(),
        Arc::new(super::certificates::SystemClock),
    )
    .await
}

/// Who a ServiceAccount token says it is: the `kubernetes.io` claims of its JWT payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSubject {
    pub namespace: String,
    pub service_account: String,
    /// The pod a pod-bound token is bound to; `None` for other tokens.
    pub pod: Option<String>,
}

/// Reads the subject of the agent's own token. Not a verification (the API server verifies
/// it on every request): how the agent learns its namespace and ServiceAccount, which its
/// ingress gateway's identity and the trust bundle's ConfigMap are named by.
pub fn token_subject(token_file: &Path) -> anyhow::Result<TokenSubject> {
    use base64::Engine;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading the pod-bound token {}", token_file.display()))?;
    let bad = |why: &str| anyhow::anyhow!("{}: {why}", token_file.display());
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("not a JWT (no payload)"))?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| bad("the JWT payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| bad("the JWT payload is not JSON"))?;
    let kubernetes = &claims["kubernetes.io"];
    let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
    Ok(TokenSubject {
        namespace: text(&kubernetes["namespace"]).ok_or_else(|| {
            bad("no kubernetes.io.namespace claim: not a bound ServiceAccount token")
        })?,
        service_account: text(&kubernetes["serviceaccount"]["name"])
            .ok_or_else(|| bad("no kubernetes.io.serviceaccount.name claim"))?,
        pod: text(&kubernetes["pod"]["name"]),
    })
}

/// `mesh-<node>-`, cut so that the generated name (5 more characters) stays a valid name.
fn csr_name_prefix(node_name: &str) -> String {
    let mut prefix = format!("mesh-{node_name}");
    prefix.truncate(240);
    prefix.push('-');
    prefix
}

fn issuer_error(message: String) -> CertificateError {
    CertificateError::Issuer(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca::CertificateAuthority, spiffe::TrustDomain};

    fn pem_of(leaf: &CertificateDer<'_>) -> Vec<u8> {
        pem::encode(&pem::Pem::new("CERTIFICATE", leaf.to_vec())).into_bytes()
    }

    #[test]
    fn a_tokens_subject_is_read_from_its_kubernetes_claims() {
        use base64::Engine;
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let payload = r#"{"aud":["api"],"kubernetes.io":{"namespace":"sidecarless-system","pod":{"name":"mesh-agent-x1","uid":"u"},"serviceaccount":{"name":"mesh-agent","uid":"v"}}}"#;
        std::fs::write(&file, format!("{}.{}.sig\n", encode("{}"), encode(payload))).unwrap();
        assert_eq!(
            token_subject(&file).unwrap(),
            TokenSubject {
                namespace: "sidecarless-system".into(),
                service_account: "mesh-agent".into(),
                pod: Some("mesh-agent-x1".into()),
            }
        );
        // A legacy Secret token names no pod, and its claims are elsewhere.
        let legacy =
            r#"{"iss":"kubernetes/serviceaccount","kubernetes.io/serviceaccount/namespace":"x"}"#;
        std::fs::write(&file, format!("{}.{}.sig", encode("{}"), encode(legacy))).unwrap();
        let error = token_subject(&file).unwrap_err().to_string();
        assert!(
            error.contains("not a bound ServiceAccount token"),
            "{error}"
        );
        std::fs::write(&file, "not a jwt").unwrap();
        assert!(token_subject(&file)
            .unwrap_err()
            .to_string()
            .contains("not a JWT"));
    }

    #[test]
    fn only_a_certificate_of_the_bundle_for_this_key_and_identity_is_believed() {
        let now = SystemTime::now();
        let lifetime = Duration::from_secs(24 * 3600);
        let ca =
            CertificateAuthority::generate(TrustDomain::default(), now, 10 * lifetime).unwrap();
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let db = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/db").unwrap();
        let key = crate::identity::certificates::generate_key().unwrap();
        let bundle = ca.trust_bundle();

        let (leaf, not_after) = ca.sign(&web, &key, now, lifetime).unwrap();
        let issued = check_answer(bundle, &web, &key, "c", &pem_of(&leaf)).unwrap();
        assert_eq!(issued.chain, std::slice::from_ref(&leaf));
        // X.509 keeps whole seconds.
        let expected = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let got = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(got, expected);

        let refused = |pem: &[u8], identity: &SpiffeId, says: &str| {
            let error = check_answer(bundle, identity, &key, "c", pem).unwrap_err();
            assert!(error.to_string().contains(says), "{error}");
        };
        refused(
            &pem_of(&leaf),
            &db,
            "names spiffe://cluster.local/ns/shop/sa/web, not",
        );
        let other_key = crate::identity::certificates::generate_key().unwrap();
        let (for_other_key, _) = ca.sign(&web, &other_key, now, lifetime).unwrap();
        refused(
            &pem_of(&for_other_key),
            &web,
            "not for the key this agent made",
        );
        let impostor =
            CertificateAuthority::generate(TrustDomain::default(), now, 10 * lifetime).unwrap();
        let (foreign, _) = impostor.sign(&web, &key, now, lifetime).unwrap();
        refused(
            &pem_of(&foreign),
            &web,
            "not signed by a root of the trust bundle",
        );
        refused(b"", &web, "is empty");
    }
}
