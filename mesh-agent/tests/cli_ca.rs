//! `mesh-agent ca init DIR`: makes a CA that loads back, refuses to overwrite one, and refuses
//! a bad trust domain.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command, time::SystemTime};

use mesh_agent::identity::ca::{CertificateAuthority, CA_KEY_FILE};

fn mesh_agent(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn init(dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["ca", "init", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    mesh_agent(&args)
}

#[test]
fn init_makes_a_ca_the_agent_can_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let (ok, out, err) = init(&dir, &["--trust-domain", "prod.example.com"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("trust domain prod.example.com"), "{out}");
    let key_mode = std::fs::metadata(dir.join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let ca = CertificateAuthority::load(&dir, SystemTime::now()).unwrap();
    assert_eq!(ca.trust_domain().as_str(), "prod.example.com");
}

#[test]
fn the_default_trust_domain_is_istios() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = init(tmp.path(), &[]);
    assert!(ok, "{out}{err}");
    let ca = CertificateAuthority::load(tmp.path(), SystemTime::now()).unwrap();
    assert_eq!(ca.trust_domain().as_str(), "cluster.local");
}

#[test]
fn init_refuses_to_overwrite_a_ca() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path(), &[]).0);
    let key = std::fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
    let (ok, out, err) = init(tmp.path(), &[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("ca-key.pem already exists: refusing to overwrite a CA"),
        "{err}"
    );
    assert_eq!(std::fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), key);
}

#[test]
fn a_bad_trust_domain_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let (ok, _, err) = init(&dir, &["--trust-domain", "Prod.Example"]);
    assert!(!ok);
    assert!(
        err.contains("invalid trust domain \"Prod.Example\""),
        "{err}"
    );
    assert!(!dir.exists());
}

#[test]
fn help_shows_an_example() {
    let (ok, out, _) = mesh_agent(&["ca", "init", "--help"]);
    assert!(ok);
    assert!(out.contains("mesh-agent ca init /etc/mesh/ca"), "{out}");
    assert!(out.contains("--trust-domain"), "{out}");
}

#[test]
fn serve_checks_the_ca_before_anything_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = mesh_agent(&["ca", "serve", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("ca-key.pem"), "names the missing file: {err}");

    // A key others can read is refused, with the fix.
    let dir = tmp.path().join("ca");
    assert!(init(&dir, &[]).0);
    std::fs::set_permissions(
        dir.join(CA_KEY_FILE),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, _, err) = mesh_agent(&["ca", "serve", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");

    // A sound CA and no API server: the error says which step failed.
    std::fs::set_permissions(
        dir.join(CA_KEY_FILE),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let kubeconfig = tmp.path().join("missing.kubeconfig");
    let (ok, _, err) = mesh_agent(&[
        "ca",
        "serve",
        dir.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("connecting to the API server"), "{err}");
}

#[test]
fn serve_help_says_what_it_signs() {
    let (ok, out, _) = mesh_agent(&["ca", "serve", "--help"]);
    assert!(ok);
    assert!(out.contains("sidecarless.io/workload"), "{out}");
    assert!(out.contains("--agent-namespace"), "{out}");
    assert!(out.contains("mesh-ca-root-cert"), "{out}");
}
