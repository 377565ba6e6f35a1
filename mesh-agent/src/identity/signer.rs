//! `mesh-agent ca serve`: Kubernetes mode's signer. It approves and signs the workload
//! CertificateSigningRequests (`certificates.k8s.io/v1`) of our [`SIGNER_NAME`], and only those
//! a node's agent may ask for: a node's agent must never obtain another node's workload
//! identities (ztunnel's rule).
//!
//! All agents share one ServiceAccount, so the requester is tied to its *pod*: an agent creates
//! its CSRs with a pod-bound ServiceAccount token (a projected token, which the kubelet requests
//! with a `boundObjectRef` to the agent's pod), and the API server records the token's pod in the
//! CSR's `spec.extra` (`authentication.kubernetes.io/pod-name` and `pod-uid`, served since 1.12,
//! checked on 1.20 by tests/tests/csr.rs). From the agent's pod comes its node; the CSR is
//! signed only if a pod of the requested identity's namespace and service account runs on that
//! node. [`review`] is that decision, a pure function of the CSR and the pods.
//!
//! The signer also publishes the trust bundle (`root-cert.pem` of the CA folder) in the ConfigMap
//! [`BUNDLE_CONFIGMAP`] of the agents' namespace, where agents read it.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition},
        core::v1::{ConfigMap, Pod},
    },
    ByteString,
};
use kube::{
    api::{ListParams, ObjectMeta, PostParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use rcgen::{CertificateSigningRequestParams, PublicKey};
use rustls::pki_types::{pem::PemObject, CertificateSigningRequestDer};
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::FromDer,
};

use super::{
    ca::{CertificateAuthority, ROOT_CERT_FILE},
    spiffe::{SpiffeId, TrustDomain},
};

/// The `signerName` of the mesh's workload CSRs. Kubernetes' own signers
/// (`kubernetes.io/...`) never sign them, and RBAC grants approve/sign on this name alone.
pub const SIGNER_NAME: &str = "sidecarless.io/workload";

/// The ConfigMap (in the agents' namespace) holding the trust bundle, and its key: Istio's
/// `istio-ca-root-cert` holds `root-cert.pem` the same way.
pub const BUNDLE_CONFIGMAP: &str = "mesh-ca-root-cert";
pub const BUNDLE_KEY: &str = ROOT_CERT_FILE;

/// What the API server records from a pod-bound ServiceAccount token.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// The `spec.usages` a workload CSR may ask for: what [`CertificateAuthority::sign`] gives.
pub const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// Who may ask for what.
#[derive(Clone, Debug)]
pub struct Policy {
    pub trust_domain: TrustDomain,
    /// The agents' namespace and ServiceAccount: only they may ask.
    pub agent_namespace: String,
    pub agent_service_account: String,
}

impl Policy {
    fn agent_username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.agent_namespace, self.agent_service_account
        )
    }
}

/// A CSR that passed every check: sign `public_key` for `identity`.
#[derive(Debug)]
pub struct Approval {
    pub identity: SpiffeId,
    pub public_key: PublicKey,
    /// The requesting agent's node.
    pub node: String,
}

/// Why a CSR is refused: `reason` is the condition's CamelCase reason, `message` says what
/// failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
}

fn deny(reason: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        reason,
        message: message.into(),
    }
}

/// The pod a CSR's requester authenticated as (from its pod-bound token): name and uid.
pub fn requester_pod(csr: &CertificateSigningRequest) -> Result<(String, String), Denial> {
    let extra = csr.spec.extra.clone().unwrap_or_default();
    let one = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Ok(value.clone()),
        _ => Err(deny(
            "NotPodBound",
            format!(
                "the requester's credentials name no pod ({key} missing from spec.extra): \
                 agents must use a pod-bound ServiceAccount token"
            ),
        )),
    };
    Ok((one(POD_NAME_EXTRA)?, one(POD_UID_EXTRA)?))
}

/// Decides a workload CSR. `requester` is the pod the requester's token is bound to, as the API
/// server has it now (`None` if it does not exist); `namespace_pods` are the pods of the
/// namespace of the identity the CSR asks for.
pub fn review(
    policy: &Policy,
    csr: &CertificateSigningRequest,
    requester: Option<&Pod>,
    namespace_pods: &[Pod],
) -> Result<Approval, Denial> {
    let spec = &csr.spec;
    if spec.signer_name != SIGNER_NAME {
        return Err(deny(
            "WrongSigner",
            format!("signerName {} is not {SIGNER_NAME}", spec.signer_name),
        ));
    }
    let username = spec.username.as_deref().unwrap_or_default();
    if username != policy.agent_username() {
        return Err(deny(
            "RequesterNotAgent",
            format!(
                "requested by {username:?}, not the agents' ServiceAccount {}",
                policy.agent_username()
            ),
        ));
    }
    let (pod_name, pod_uid) = requester_pod(csr)?;
    let Some(agent) = requester else {
        return Err(deny(
            "RequesterPodGone",
            format!(
                "the requester's pod {}/{pod_name} does not exist",
                policy.agent_namespace
            ),
        ));
    };
    let agent_meta = &agent.metadata;
    if agent_meta.uid.as_deref() != Some(pod_uid.as_str())
        || agent_meta.name.as_deref() != Some(pod_name.as_str())
        || agent_meta.namespace.as_deref() != Some(policy.agent_namespace.as_str())
    {
        return Err(deny(
            "RequesterPodGone",
            format!(
                "the requester's pod {}/{pod_name} with uid {pod_uid} does not exist (a pod of \
                 that name was replaced)",
                policy.agent_namespace
            ),
        ));
    }
    let agent_spec = agent.spec.clone().unwrap_or_default();
    if agent_spec.service_account_name.as_deref() != Some(policy.agent_service_account.as_str()) {
        return Err(deny(
            "RequesterNotAgent",
            format!(
                "the requester's pod {pod_name} does not run as the agents' ServiceAccount {}",
                policy.agent_service_account
            ),
        ));
    }
    if agent_meta.deletion_timestamp.is_some() || is_finished(agent) {
        return Err(deny(
            "RequesterPodGone",
            format!("the requester's pod {pod_name} is terminating or finished"),
        ));
    }
    let Some(node) = agent_spec.node_name.filter(|node| !node.is_empty()) else {
        return Err(deny(
            "RequesterPodUnscheduled",
            format!("the requester's pod {pod_name} is bound to no node"),
        ));
    };

    let (identity, public_key) = read_request(policy, csr)?;
    let of_identity: Vec<&Pod> = namespace_pods
        .iter()
        .filter(|pod| pod.metadata.namespace.as_deref() == Some(identity.namespace()))
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && !is_finished(pod))
        .filter(|pod| service_account(pod) == identity.service_account())
        .collect();
    if of_identity.iter().any(|pod| node_of(pod) == Some(&node)) {
        return Ok(Approval {
            identity,
            public_key,
            node,
        });
    }
    if let Some(elsewhere) = of_identity.iter().find_map(|pod| node_of(pod)) {
        return Err(deny(
            "WorkloadOnAnotherNode",
            format!(
                "no pod of service account {} in namespace {} runs on node {node} (the \
                 requesting agent's); they run on {elsewhere}",
                identity.service_account(),
                identity.namespace()
            ),
        ));
    }
    Err(deny(
        "NoSuchWorkload",
        format!(
            "no running pod of namespace {} has service account {} on node {node} (the \
             requesting agent's)",
            identity.namespace(),
            identity.service_account()
        ),
    ))
}

/// Checks the PKCS#10 request itself: its signature, an ECDSA P-256 key, exactly one SAN, a URI
/// naming a SPIFFE ID of our trust domain, no CA request, and usages among [`USAGES`].
fn read_request(
    policy: &Policy,
    csr: &CertificateSigningRequest,
) -> Result<(SpiffeId, PublicKey), Denial> {
    let bad = |message: String| deny("BadRequest", message);
    for usage in csr.spec.usages.iter().flatten() {
        if !USAGES.contains(&usage.as_str()) {
            return Err(bad(format!(
                "usage {usage:?} is not one of a workload's ({})",
                USAGES.join(", ")
            )));
        }
    }
    let der = CertificateSigningRequestDer::from_pem_slice(&csr.spec.request.0).map_err(|e| {
        bad(format!(
            "spec.request is not a PEM certificate request: {e}"
        ))
    })?;
    // Verifies the request's signature (proof of possession of the key).
    let params = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| bad(format!("the certificate request is refused: {e}")))?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| bad(format!("unreadable certificate request: {e}")))?;
    let key = &parsed.certification_request_info.subject_pki.algorithm;
    let p256 = key.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && key
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256);
    if !p256 {
        return Err(bad("the key is not an ECDSA P-256 key".into()));
    }
    if !matches!(
        params.params.is_ca,
        rcgen::IsCa::NoCa | rcgen::IsCa::ExplicitNoCa
    ) {
        return Err(bad("it asks for a CA certificate".into()));
    }
    let mut uris = Vec::new();
    let mut others = 0;
    for extension in parsed.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(uri.to_string()),
                    _ => others += 1,
                }
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(bad(format!(
            "it has {} URI SANs; a workload certificate has exactly one, its SPIFFE ID",
            uris.len()
        )));
    };
    if others > 0 {
        return Err(bad(format!(
            "it has {others} SANs besides its SPIFFE ID; a workload certificate has none"
        )));
    }
    let identity = SpiffeId::parse(uri).map_err(|e| bad(format!("URI SAN {uri:?}: {e}")))?;
    if identity.trust_domain() != &policy.trust_domain {
        return Err(bad(format!(
            "{identity} is not in trust domain {}, the only one this signer signs for",
            policy.trust_domain
        )));
    }
    Ok((identity, params.public_key))
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default")
}

fn node_of(pod: &Pod) -> Option<&String> {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_ref())
        .filter(|node| !node.is_empty())
}

/// Whether a CSR still waits for this signer: no Denied or Failed condition, no certificate.
fn is_pending(csr: &CertificateSigningRequest) -> bool {
    let status = csr.status.clone().unwrap_or_default();
    status.certificate.is_none()
        && !status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Denied" || c.type_ == "Failed")
}

fn is_approved(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Approved" && c.status == "True")
}

/// `ca serve`'s settings.
#[derive(Debug, Clone)]
pub struct SignerSettings {
    pub agent_namespace: String,
    pub agent_service_account: String,
    pub lifetime: Duration,
}

/// Runs the signer until the watch fails for good: publishes the trust bundle, then approves and
/// signs, or denies, each pending CSR of [`SIGNER_NAME`].
pub async fn serve(
    client: Client,
    ca: Arc<CertificateAuthority>,
    settings: SignerSettings,
) -> anyhow::Result<()> {
    let policy = Policy {
        trust_domain: ca.trust_domain().clone(),
        agent_namespace: settings.agent_namespace.clone(),
        agent_service_account: settings.agent_service_account.clone(),
    };
    publish_bundle(&client, &settings.agent_namespace, &ca).await?;
    tracing::info!(
        signer = SIGNER_NAME,
        trust_domain = %policy.trust_domain,
        bundle = format!("{}/{BUNDLE_CONFIGMAP}", settings.agent_namespace),
        "signing workload certificates"
    );
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let signer = Signer {
        client,
        csrs: csrs.clone(),
        ca,
        policy,
        lifetime: settings.lifetime,
    };
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    let mut events = watcher::watcher(csrs, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(csr) = events.try_next().await? {
        if csr.spec.signer_name != SIGNER_NAME || !is_pending(&csr) {
            continue;
        }
        let name = csr.metadata.name.clone().unwrap_or_default();
        match signer.decide(csr).await {
            Ok(()) => {}
            // A version older than one already decided (the watch's event of this signer's own
            // approval, arriving after the certificate was written): nothing to do.
            Err(error) if is_conflict(&error) => {
                tracing::debug!(csr = %name, "a stale version of the CSR: skipped")
            }
            // The watch brings it back on its next change or relist.
            Err(error) => {
                tracing::warn!(csr = %name, error = format!("{error:#}"), "deciding a CSR failed")
            }
        }
    }
    Ok(())
}

fn is_conflict(error: &anyhow::Error) -> bool {
    matches!(error.downcast_ref::<kube::Error>(), Some(kube::Error::Api(status)) if status.code == 409)
}

struct Signer {
    client: Client,
    csrs: Api<CertificateSigningRequest>,
    ca: Arc<CertificateAuthority>,
    policy: Policy,
    lifetime: Duration,
}

impl Signer {
    async fn decide(&self, mut csr: CertificateSigningRequest) -> anyhow::Result<()> {
        let name = csr.metadata.name.clone().unwrap_or_default();
        let decision = self.review(&csr).await?;
        let approved = is_approved(&csr);
        let approval = match decision {
            Ok(approval) => approval,
            Err(denial) => {
                tracing::info!(csr = %name, reason = denial.reason, message = %denial.message, "denied");
                // Approved by someone else, the approval cannot be taken back: it fails.
                let kind = if approved { "Failed" } else { "Denied" };
                push_condition(&mut csr, kind, denial.reason, &denial.message);
                if approved {
                    self.csrs
                        .replace_status(&name, &PostParams::default(), &csr)
                        .await?;
                } else {
                    self.replace_approval(&name, &csr).await?;
                }
                return Ok(());
            }
        };
        if !approved {
            let message = format!(
                "{} runs on node {}, the requesting agent's",
                approval.identity, approval.node
            );
            push_condition(&mut csr, "Approved", "WorkloadOnRequesterNode", &message);
            csr = self.replace_approval(&name, &csr).await?;
        }
        let (leaf, _) = self.ca.sign(
            &approval.identity,
            &approval.public_key,
            SystemTime::now(),
            self.lifetime,
        )?;
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.to_vec()));
        csr.status.get_or_insert_with(Default::default).certificate =
            Some(ByteString(pem.into_bytes()));
        self.csrs
            .replace_status(&name, &PostParams::default(), &csr)
            .await?;
        tracing::info!(csr = %name, identity = %approval.identity, node = %approval.node, "signed");
        Ok(())
    }

    /// Fetches the pods the decision depends on, then decides.
    async fn review(
        &self,
        csr: &CertificateSigningRequest,
    ) -> anyhow::Result<Result<Approval, Denial>> {
        let requester = match requester_pod(csr) {
            Ok((name, _)) => {
                let agents: Api<Pod> =
                    Api::namespaced(self.client.clone(), &self.policy.agent_namespace);
                agents.get_opt(&name).await?
            }
            Err(_) => None,
        };
        // The namespace of the identity asked for; an unreadable request is denied by review
        // before the pods are consulted.
        let namespace_pods = match read_request(&self.policy, csr) {
            Ok((identity, _)) => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), identity.namespace());
                pods.list(&ListParams::default()).await?.items
            }
            Err(_) => Vec::new(),
        };
        Ok(review(
            &self.policy,
            csr,
            requester.as_ref(),
            &namespace_pods,
        ))
    }

    async fn replace_approval(
        &self,
        name: &str,
        csr: &CertificateSigningRequest,
    ) -> anyhow::Result<CertificateSigningRequest> {
        Ok(self
            .csrs
            .replace_subresource("approval", name, &PostParams::default(), csr)
            .await?)
    }
}

fn push_condition(csr: &mut CertificateSigningRequest, kind: &str, reason: &str, message: &str) {
    csr.status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new)
        .push(CertificateSigningRequestCondition {
            type_: kind.to_owned(),
            status: "True".to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            ..Default::default()
        });
}

/// Writes the CA folder's trust bundle into the [`BUNDLE_CONFIGMAP`] ConfigMap of `namespace`,
/// creating it or replacing what differs.
pub async fn publish_bundle(
    client: &Client,
    namespace: &str,
    ca: &CertificateAuthority,
) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([(BUNDLE_KEY.to_owned(), ca.trust_bundle().to_pem())]);
    match api.get_opt(BUNDLE_CONFIGMAP).await? {
        Some(existing) if existing.data.as_ref() == Some(&data) => {}
        Some(mut existing) => {
            existing.data = Some(data);
            api.replace(BUNDLE_CONFIGMAP, &PostParams::default(), &existing)
                .await?;
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(BUNDLE_CONFIGMAP.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &map).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
