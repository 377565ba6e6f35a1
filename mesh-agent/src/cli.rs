//! `mesh-agent apply`, `delete` and `get`: the tutorial's `oc create/replace/delete -f` and
//! `oc get` for local mode, talking to a running agent's admin API over its Unix socket;
//! `mesh-agent stat`, the metrics of the last seconds as a table; `mesh-agent ca init`, which
//! makes the mesh's CA, and `ca serve`, Kubernetes mode's signer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::{
    admin::client,
    identity::{
        ca::{CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE},
        spiffe::TrustDomain,
    },
};

/// Prints the stat table over `window`: once, after reading the agent's metrics at both its
/// ends, or with `watch`, redrawn every second over the readings of the last `window`.
#[expect(
    clippy::disallowed_methods,
    reason = "the CLI's own thread waits between readings, not an agent's"
)]
pub fn stat(admin_socket: &Path, window: std::time::Duration, watch: bool) -> Result<()> {
    use crate::telemetry::{reading, stat};
    use std::time::Instant;
    let read = || -> Result<reading::Reading> {
        let (status, body) = client::request(
            admin_socket,
            Method::GET,
            "/stats/prometheus",
            String::new(),
        )?;
        if status != StatusCode::OK {
            bail!(
                "the agent answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(reading::reading(&String::from_utf8_lossy(&body)))
    };
    let mut readings = reading::Readings::new(window);
    let show = |readings: &reading::Readings| {
        let (edges, seconds) = readings.last(window).unwrap_or_default();
        stat::table(&stat::rows(&edges, seconds), seconds)
    };
    readings.push(Instant::now(), read()?);
    if !watch {
        std::thread::sleep(window);
        readings.push(Instant::now(), read()?);
        print!("{}", show(&readings));
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        readings.push(Instant::now(), read()?);
        // Clear the screen and go home, as `watch` does.
        print!("\x1b[2J\x1b[H{}", show(&readings));
        use std::io::Write;
        std::io::stdout().flush()?;
    }
}

/// Makes a new root CA in `dir` and says what it wrote.
pub fn ca_init(dir: &Path, trust_domain: TrustDomain) -> Result<()> {
    let ca = CertificateAuthority::init(dir, trust_domain, std::time::SystemTime::now())?;
    let until = time::OffsetDateTime::from(ca.not_after()).date();
    println!(
        "created a root CA for trust domain {} in {}:",
        ca.trust_domain(),
        dir.display()
    );
    println!("  {CA_KEY_FILE}    the root's private key (mode 0600): keep it secret");
    println!("  {CA_CERT_FILE}   the root's certificate, valid until {until}");
    println!("  {ROOT_CERT_FILE} the trust bundle agents check peers against");
    Ok(())
}

/// Runs Kubernetes mode's signer with the CA in `dir` until it fails (or is killed). The CA is
/// checked before the API server is contacted.
pub fn ca_serve(
    dir: &Path,
    kubeconfig: Option<PathBuf>,
    settings: crate::identity::signer::SignerSettings,
) -> Result<()> {
    let ca = CertificateAuthority::load(dir, std::time::SystemTime::now())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = crate::identity::csr::kube_client(kubeconfig.as_deref(), None)
            .await
            .context("connecting to the API server")?;
        crate::identity::signer::serve(client, std::sync::Arc::new(ca), settings).await
    })
}

/// Applies (or deletes) each file in order; a directory means its YAML/JSON files, sorted.
/// Stops at the first file the agent rejects, after printing why.
pub fn change(admin_socket: &Path, files: &[PathBuf], delete: bool) -> Result<()> {
    let endpoint = if delete { "/delete" } else { "/apply" };
    for file in expand(files)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let label = file.display().to_string();
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("file", &label)
            .finish();
        let path = format!("{endpoint}?{query}");
        let (status, body) = client::request(admin_socket, Method::POST, &path, text)?;
        let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
        if status != StatusCode::OK {
            match answer["diagnostics"].as_array() {
                Some(lines) => {
                    for line in lines {
                        eprintln!("{}", line.as_str().unwrap_or_default());
                    }
                }
                // Refused before the file was read (403, 413): the agent says why in text.
                None => eprint!("{status}: {}", String::from_utf8_lossy(&body)),
            }
            bail!("{label} was rejected; the config in force is unchanged");
        }
        let verb = if delete { "deleted" } else { "configured" };
        for object in answer["objects"].as_array().into_iter().flatten() {
            println!("{} {verb}", object.as_str().unwrap_or_default());
        }
        // As kubectl does: accepted, but something in it has no effect.
        for line in answer["warnings"].as_array().into_iter().flatten() {
            eprintln!("{}", line.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// Prints the objects in force of `kind` (kubectl's names work: `vs`, `virtualservices`, `httproutes`, …).
pub fn get(admin_socket: &Path, kind: &str, name: Option<&str>, yaml: bool) -> Result<()> {
    let (status, body) = client::request(admin_socket, Method::GET, "/config_dump", String::new())?;
    if status != StatusCode::OK {
        bail!("the agent answered {status}");
    }
    let dump: Value = serde_json::from_slice(&body)?;
    let kind = canonical_kind(kind);
    let objects: Vec<&Value> = dump["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            kind == "all"
                || o["kind"]
                    .as_str()
                    .is_some_and(|k| k.eq_ignore_ascii_case(&kind))
        })
        .filter(|o| name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    if yaml {
        for object in &objects {
            println!("---\n{}", yaml_serde::to_string(object)?.trim_end());
        }
        return Ok(());
    }
    println!("{:<18} {:<12} NAME", "KIND", "NAMESPACE");
    for object in objects {
        println!(
            "{:<18} {:<12} {}",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default"),
            object["metadata"]["name"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

fn canonical_kind(kind: &str) -> String {
    match kind.to_ascii_lowercase().as_str() {
        "vs" | "virtualservice" | "virtualservices" => "VirtualService",
        "dr" | "destinationrule" | "destinationrules" => "DestinationRule",
        "gw" | "gateway" | "gateways" => "Gateway",
        "httproute" | "httproutes" => "HTTPRoute",
        "grpcroute" | "grpcroutes" => "GRPCRoute",
        "svc" | "service" | "services" => "Service",
        "endpointslice" | "endpointslices" => "EndpointSlice",
        "po" | "pod" | "pods" => "Pod",
        _ => return kind.to_owned(),
    }
    .to_owned()
}

fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            crate::config::config_files(path, &mut files)
                .with_context(|| format!("reading {}", path.display()))?;
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::canonical_kind;

    #[test]
    fn kubectls_names_of_a_kind_are_understood() {
        assert_eq!(canonical_kind("vs"), "VirtualService");
        assert_eq!(canonical_kind("httproutes"), "HTTPRoute");
        assert_eq!(canonical_kind("GRPCRoute"), "GRPCRoute");
        assert_eq!(canonical_kind("Sidecar"), "Sidecar");
    }
}
