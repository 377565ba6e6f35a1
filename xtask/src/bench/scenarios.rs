//! What is measured: who calls what, through which proxy, compared with which baseline.

use super::proxies::{
    HAPROXY_L4_PORT, HAPROXY_L7_PORT, HELLO_1K_PORT, HELLO_PORT, HYPER_PORT, NGINX_PORT, TCP_PORT,
    VIP_L4, VIP_L7, VIP_L7_1K, VIP_REMOTE,
};
use super::topology::{AgentMode, Topology};

/// The process doing the hop, whose CPU time and memory the report shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    None,
    Agent,
    /// The same agent restarted with `--socket-fast-path` (sockmap + sk_msg).
    AgentSocketFastPath,
    /// The same agent restarted with `--ca`: it tunnels to node 2's agent in mutual TLS. (Node
    /// 2's agent runs on the servers' core, so the server core's CPU time per request counts
    /// both ends.)
    AgentMutualTls,
    /// The second agent, started with `--redirect iptables`.
    AgentIptables,
    Nginx,
    Haproxy,
    /// hyper's server and hyper-util's client and nothing else (`hyper_proxy.rs`).
    Hyper,
}

#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// The scenario whose figures this one's "added" cost is measured against.
    pub baseline: &'static str,
    pub proxy: Proxy,
    /// The body size of the answer, for the report.
    pub body: &'static str,
    target: Target,
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// A hello server in `server-v1`, called from the plain client.
    Server(u16),
    /// A hello server in `remote-v1` on node 2, called from the plain client.
    RemoteServer(u16),
    /// A service VIP, called from the enrolled client: the kernel hands it to the agent.
    Vip(std::net::Ipv4Addr, u16),
    /// A service VIP, called from the client enrolled in the iptables-mode agent: its
    /// `REDIRECT` rule hands it to that agent.
    VipIptables(std::net::Ipv4Addr, u16),
    /// A peer proxy in the `proxy` pod, called from the plain client.
    Proxy(u16),
}

pub const ALL: &[Scenario] = &[
    Scenario {
        name: "direct",
        baseline: "direct",
        proxy: Proxy::None,
        body: "12 B",
        target: Target::Server(HELLO_PORT),
    },
    Scenario {
        name: "direct-1k",
        baseline: "direct-1k",
        proxy: Proxy::None,
        body: "1 KiB",
        target: Target::Server(HELLO_1K_PORT),
    },
    Scenario {
        name: "mesh-l7",
        baseline: "direct",
        proxy: Proxy::Agent,
        body: "12 B",
        target: Target::Vip(VIP_L7, HELLO_PORT),
    },
    Scenario {
        name: "mesh-l7-1k",
        baseline: "direct-1k",
        proxy: Proxy::Agent,
        body: "1 KiB",
        target: Target::Vip(VIP_L7_1K, HELLO_1K_PORT),
    },
    Scenario {
        name: "mesh-l7-sockmap",
        baseline: "direct",
        proxy: Proxy::AgentSocketFastPath,
        body: "12 B",
        target: Target::Vip(VIP_L7, HELLO_PORT),
    },
    Scenario {
        name: "direct-remote",
        baseline: "direct-remote",
        proxy: Proxy::None,
        body: "12 B",
        target: Target::RemoteServer(HELLO_PORT),
    },
    Scenario {
        name: "mesh-l7-remote",
        baseline: "direct-remote",
        proxy: Proxy::Agent,
        body: "12 B",
        // mesh-l7's service, split and policies, over node 2's pods: in plaintext.
        target: Target::Vip(VIP_REMOTE, HELLO_PORT),
    },
    Scenario {
        name: "mesh-mtls",
        baseline: "direct-remote",
        proxy: Proxy::AgentMutualTls,
        body: "12 B",
        // The same, through mutual TLS tunnels to node 2's agent.
        target: Target::Vip(VIP_REMOTE, HELLO_PORT),
    },
    Scenario {
        name: "mesh-l4",
        baseline: "direct",
        proxy: Proxy::Agent,
        body: "12 B",
        target: Target::Vip(VIP_L4, TCP_PORT),
    },
    Scenario {
        name: "mesh-iptables",
        baseline: "direct",
        proxy: Proxy::AgentIptables,
        body: "12 B",
        // The same service and 90/10 VirtualService as `mesh-l7`: only the redirect differs.
        target: Target::VipIptables(VIP_L7, HELLO_PORT),
    },
    Scenario {
        name: "nginx-l7",
        baseline: "direct",
        proxy: Proxy::Nginx,
        body: "12 B",
        target: Target::Proxy(NGINX_PORT),
    },
    Scenario {
        name: "haproxy-l7",
        baseline: "direct",
        proxy: Proxy::Haproxy,
        body: "12 B",
        target: Target::Proxy(HAPROXY_L7_PORT),
    },
    Scenario {
        name: "haproxy-l4",
        baseline: "direct",
        proxy: Proxy::Haproxy,
        body: "12 B",
        target: Target::Proxy(HAPROXY_L4_PORT),
    },
    Scenario {
        name: "hyper-l7",
        baseline: "direct",
        proxy: Proxy::Hyper,
        body: "12 B",
        target: Target::Proxy(HYPER_PORT),
    },
];

/// The scenarios named in `only` (all when empty), with the baselines they are measured against.
pub fn select(only: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if let Some(unknown) = only
        .iter()
        .find(|name| !ALL.iter().any(|s| s.name == *name))
    {
        let known: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        anyhow::bail!("no scenario {unknown:?}; there are {known:?}");
    }
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    Ok(ALL
        .iter()
        .filter(|s| wanted(s.name) || ALL.iter().any(|o| wanted(o.name) && o.baseline == s.name))
        .copied()
        .collect())
}

impl Scenario {
    /// Puts the eBPF agent in the mode the scenario measures (a restart when it changes).
    pub fn prepare(&self, topology: &Topology) -> anyhow::Result<()> {
        match self.proxy {
            Proxy::Agent => topology.use_agent_mode(AgentMode::Plain),
            Proxy::AgentSocketFastPath => topology.use_agent_mode(AgentMode::SocketFastPath),
            Proxy::AgentMutualTls => topology.use_agent_mode(AgentMode::MutualTls),
            _ => Ok(()),
        }
    }

    /// Whether the scenario goes through the eBPF agent.
    pub fn through_ebpf_agent(&self) -> bool {
        matches!(
            self.proxy,
            Proxy::Agent | Proxy::AgentSocketFastPath | Proxy::AgentMutualTls
        )
    }

    /// Whether an agent routes the scenario's requests by the 90/10 VirtualService (every
    /// agent scenario but `mesh-l4`, which carries bytes).
    pub fn split_by_agent(&self) -> bool {
        self.proxy != Proxy::None
            && !matches!(self.proxy, Proxy::Nginx | Proxy::Haproxy | Proxy::Hyper)
            && !matches!(self.target, Target::Vip(VIP_L4, _))
    }

    /// The URL the load generator calls, and the pod it runs in.
    pub fn target<'t>(&self, topology: &'t Topology) -> (String, &'t mesh_tests::Pod) {
        match self.target {
            Target::Server(port) => (
                format!("http://{}/", topology.server_v1.addr(port)),
                &topology.client,
            ),
            Target::RemoteServer(port) => (
                format!("http://{}/", topology.remote_v1.addr(port)),
                &topology.client,
            ),
            // The agent routes an IP `Host` by the VIP's service, as Envoy does.
            Target::Vip(vip, port) => (format!("http://{vip}:{port}/"), &topology.client_mesh),
            Target::VipIptables(vip, port) => {
                (format!("http://{vip}:{port}/"), &topology.client_iptables)
            }
            Target::Proxy(port) => (
                format!("http://{}/", topology.proxy.addr(port)),
                &topology.client,
            ),
        }
    }

    /// Every process the scenario's requests pass through besides client and server: the
    /// proxy, and for `mesh-mtls` the destination's agent too.
    pub fn mesh_pids(&self, topology: &Topology) -> Vec<u32> {
        let mut pids: Vec<u32> = self.proxy_pid(topology).into_iter().collect();
        if self.proxy == Proxy::AgentMutualTls {
            pids.push(topology.agent_remote.pid());
        }
        pids
    }

    /// The proxy's process id, if the scenario has one.
    pub fn proxy_pid(&self, topology: &Topology) -> Option<u32> {
        match self.proxy {
            Proxy::None => None,
            Proxy::Agent | Proxy::AgentSocketFastPath | Proxy::AgentMutualTls => {
                topology.agent_pid()
            }
            Proxy::AgentIptables => Some(topology.agent_iptables.pid()),
            Proxy::Nginx => Some(topology.nginx.pid()),
            Proxy::Haproxy => Some(topology.haproxy.pid()),
            Proxy::Hyper => Some(topology.hyper.pid()),
        }
    }
}
