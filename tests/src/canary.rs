//! The tutorial's canary on one simulated node, for tests that need traffic split between two
//! versions: pods `client`, `service-c-v1-0` and `service-c-v2-0` (each answering its version's
//! name on :8080), the Service `service-c` at [`SERVICE_C`], the tutorial's DestinationRule, and
//! one of its VirtualServices (`deploy/examples/canary/`) in a config folder for the agent.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use anyhow::Result;

use crate::{Backend, ConfigDir, Pod, PodProcess, SimNode};

/// `service-c`'s VIP.
pub const SERVICE_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

pub struct Canary {
    pub client: Pod,
    /// For the agent's `--config`.
    pub config: ConfigDir,
    _servers: Vec<PodProcess>,
}

impl Canary {
    /// The pods on `node`, served by the test binary `upstream`, and the config with
    /// `virtual_service` (a file of `deploy/examples/`, e.g. `canary/2-vs-v1_and_v2_90_10.yml`).
    pub fn start(node: &SimNode, upstream: &str, virtual_service: &str) -> Result<Canary> {
        let client = node.add_pod("client")?;
        let c_v1 = node.add_pod("service-c-v1-0")?;
        let c_v2 = node.add_pod("service-c-v2-0")?;
        node.add_host("service-c", SERVICE_C)?;
        let servers = [(&c_v1, "v1"), (&c_v2, "v2")]
            .into_iter()
            .map(|(pod, name)| {
                let mut command = Command::new(upstream);
                command.args(["serve", "--listen", "0.0.0.0:8080", "--name", name]);
                let server = node.spawn_in_pod(pod, command)?;
                server.stdout().wait_for_json(
                    |line| line["listening"].is_string(),
                    Duration::from_secs(60),
                )?;
                Ok(server)
            })
            .collect::<Result<Vec<PodProcess>>>()?;
        let config = ConfigDir::new()?;
        let v1_labels: &[(&str, &str)] = &[("app", "service-c"), ("version", "v1")];
        let v2_labels: &[(&str, &str)] = &[("app", "service-c"), ("version", "v2")];
        let backends = [
            Backend {
                pod: &c_v1,
                labels: v1_labels,
            },
            Backend {
                pod: &c_v2,
                labels: v2_labels,
            },
        ];
        config.service("service-c", SERVICE_C, 8080, "http", &backends)?;
        config.copy_example("destination-rules.yml", "destination-rules.yml")?;
        config.copy_example(virtual_service, "vs.yml")?;
        Ok(Canary {
            client,
            config,
            _servers: servers,
        })
    }
}
