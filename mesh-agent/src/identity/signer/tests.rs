//! The signer's decision on every path: one approval, and a denial naming what failed for each
//! way a CSR can be wrong.

use k8s_openapi::{
    api::{
        certificates::v1::CertificateSigningRequestSpec,
        core::v1::{PodSpec, PodStatus},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use super::*;

const AGENT_UID: &str = "0b6c1f5e-agent-1";

fn policy() -> Policy {
    Policy {
        trust_domain: TrustDomain::default(),
        agent_namespace: "sidecarless-system".into(),
        agent_service_account: "mesh-agent".into(),
    }
}

fn pod(namespace: &str, name: &str, uid: &str, service_account: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

fn agent() -> Pod {
    pod(
        "sidecarless-system",
        "mesh-agent-x1",
        AGENT_UID,
        "mesh-agent",
        "node-1",
    )
}

fn workloads() -> Vec<Pod> {
    vec![
        pod("shop", "web-1", "u-web-1", "web", "node-1"),
        pod("shop", "db-1", "u-db-1", "db", "node-2"),
    ]
}

fn request_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
        .into_bytes()
}

fn request(uri: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    request_with(&key, vec![SanType::URI(uri.try_into().unwrap())])
}

fn csr(request: Vec<u8>) -> CertificateSigningRequest {
    CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some("mesh-web-abcde".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request),
            signer_name: SIGNER_NAME.into(),
            username: Some("system:serviceaccount:sidecarless-system:mesh-agent".into()),
            usages: Some(USAGES.iter().map(|u| u.to_string()).collect()),
            extra: Some(BTreeMap::from([
                (POD_NAME_EXTRA.to_owned(), vec!["mesh-agent-x1".to_owned()]),
                (POD_UID_EXTRA.to_owned(), vec![AGENT_UID.to_owned()]),
            ])),
            ..Default::default()
        },
        status: None,
    }
}

fn web() -> CertificateSigningRequest {
    csr(request("spiffe://cluster.local/ns/shop/sa/web"))
}

fn decide(csr: &CertificateSigningRequest, requester: Option<&Pod>) -> Result<Approval, Denial> {
    review(&policy(), csr, requester, &workloads())
}

#[track_caller]
fn denied(result: Result<Approval, Denial>, reason: &str, says: &str) {
    match result {
        Ok(approval) => panic!("approved {approval:?}, expected {reason}"),
        Err(denial) => {
            assert_eq!(denial.reason, reason, "{}", denial.message);
            assert!(
                denial.message.contains(says),
                "{:?} does not say {says:?}",
                denial.message
            );
        }
    }
}

#[test]
fn a_workload_of_the_requesters_node_is_approved() {
    let approval = decide(&web(), Some(&agent())).unwrap();
    assert_eq!(
        approval.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(approval.node, "node-1");
    // No usages at all is fine too (the signer decides them).
    let mut csr = web();
    csr.spec.usages = None;
    decide(&csr, Some(&agent())).unwrap();
}

#[test]
fn a_workload_of_another_node_is_denied() {
    denied(
        decide(
            &csr(request("spiffe://cluster.local/ns/shop/sa/db")),
            Some(&agent()),
        ),
        "WorkloadOnAnotherNode",
        "runs on node node-1 (the requesting agent's); they run on node-2",
    );
}

#[test]
fn a_service_account_no_pod_of_the_node_has_is_denied() {
    denied(
        decide(
            &csr(request("spiffe://cluster.local/ns/shop/sa/admin")),
            Some(&agent()),
        ),
        "NoSuchWorkload",
        "no running pod of namespace shop has service account admin on node node-1",
    );
    // Same service account name, other namespace.
    denied(
        decide(
            &csr(request("spiffe://cluster.local/ns/bank/sa/web")),
            Some(&agent()),
        ),
        "NoSuchWorkload",
        "namespace bank",
    );
    // A finished or terminating pod of the node does not count.
    let mut finished = workloads();
    finished[0].status.as_mut().unwrap().phase = Some("Succeeded".into());
    denied(
        review(&policy(), &web(), Some(&agent()), &finished),
        "NoSuchWorkload",
        "service account web",
    );
    let mut terminating = workloads();
    terminating[0].metadata.deletion_timestamp = Some(Time(Default::default()));
    denied(
        review(&policy(), &web(), Some(&agent()), &terminating),
        "NoSuchWorkload",
        "service account web",
    );
}

#[test]
fn only_the_agents_service_account_may_ask() {
    let mut csr = web();
    csr.spec.username = Some("system:serviceaccount:shop:web".into());
    denied(
        decide(&csr, Some(&agent())),
        "RequesterNotAgent",
        "\"system:serviceaccount:shop:web\"",
    );
    csr.spec.username = None;
    denied(decide(&csr, Some(&agent())), "RequesterNotAgent", "\"\"");

    let mut impostor = agent();
    impostor.spec.as_mut().unwrap().service_account_name = Some("default".into());
    denied(
        decide(&web(), Some(&impostor)),
        "RequesterNotAgent",
        "does not run as the agents' ServiceAccount mesh-agent",
    );
}

#[test]
fn a_requester_without_a_pod_bound_token_is_denied() {
    let mut csr = web();
    csr.spec.extra = None;
    denied(decide(&csr, Some(&agent())), "NotPodBound", POD_NAME_EXTRA);
    let mut csr = web();
    csr.spec
        .extra
        .as_mut()
        .unwrap()
        .insert(POD_UID_EXTRA.into(), vec![]);
    denied(decide(&csr, Some(&agent())), "NotPodBound", POD_UID_EXTRA);
}

#[test]
fn a_requester_pod_that_is_gone_replaced_or_unbound_is_denied() {
    denied(
        decide(&web(), None),
        "RequesterPodGone",
        "sidecarless-system/mesh-agent-x1 does not exist",
    );
    let mut replaced = agent();
    replaced.metadata.uid = Some("another-uid".into());
    denied(
        decide(&web(), Some(&replaced)),
        "RequesterPodGone",
        "was replaced",
    );
    let mut terminating = agent();
    terminating.metadata.deletion_timestamp = Some(Time(Default::default()));
    denied(
        decide(&web(), Some(&terminating)),
        "RequesterPodGone",
        "terminating",
    );
    let mut unbound = agent();
    unbound.spec.as_mut().unwrap().node_name = None;
    denied(
        decide(&web(), Some(&unbound)),
        "RequesterPodUnscheduled",
        "bound to no node",
    );
}

#[test]
fn another_signers_csr_is_not_ours() {
    let mut csr = web();
    csr.spec.signer_name = "kubernetes.io/kube-apiserver-client".into();
    denied(
        decide(&csr, Some(&agent())),
        "WrongSigner",
        "kube-apiserver-client",
    );
}

#[test]
fn a_request_that_is_not_a_workloads_is_denied() {
    let bad = |csr: CertificateSigningRequest, says: &str| {
        denied(decide(&csr, Some(&agent())), "BadRequest", says)
    };
    let mut usage = web();
    usage.spec.usages = Some(vec!["cert sign".into()]);
    bad(usage, "usage \"cert sign\"");

    bad(csr(b"not pem".to_vec()), "not a PEM certificate request");

    // Another key signed this request: no proof of possession.
    let pem = String::from_utf8(request("spiffe://cluster.local/ns/shop/sa/web")).unwrap();
    let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    bad(
        csr(tampered.into_bytes()),
        "the certificate request is refused",
    );

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    bad(
        csr(request_with(
            &p384,
            vec![SanType::URI(
                "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
            )],
        )),
        "not an ECDSA P-256 key",
    );

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    bad(csr(request_with(&key, vec![])), "0 URI SANs");
    bad(
        csr(request_with(
            &key,
            vec![
                uri("spiffe://cluster.local/ns/shop/sa/web"),
                uri("spiffe://cluster.local/ns/shop/sa/db"),
            ],
        )),
        "2 URI SANs",
    );
    bad(
        csr(request_with(
            &key,
            vec![
                uri("spiffe://cluster.local/ns/shop/sa/web"),
                SanType::DnsName("web.shop.svc".try_into().unwrap()),
            ],
        )),
        "1 SANs besides its SPIFFE ID",
    );
    bad(
        csr(request("spiffe://other.org/ns/shop/sa/web")),
        "not in trust domain cluster.local",
    );
    bad(csr(request("https://example.com/web")), "URI SAN");

    let mut ca_params = CertificateParams::default();
    ca_params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/web")];
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_request = ca_params.serialize_request(&key).unwrap().pem().unwrap();
    bad(csr(ca_request.into_bytes()), "CA certificate");
}
