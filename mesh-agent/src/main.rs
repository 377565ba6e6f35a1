use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    discovery::kubernetes::KubeSettings,
    engine::GatewayLabels,
    enrollment::PodSpec,
    identity::{csr, spiffe::TrustDomain},
    proxy::limits,
    redirect::RedirectMode,
    run,
};
use mesh_common::{DEFAULT_AGENT_MARK, DEFAULT_LISTEN_PORT};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them). The 8 KiB size class, hyper's read and write buffers (two a connection), in
/// slabs of four rather than one each: one to a slab, every buffer beyond the thread cache's
/// twenty took a slab of its own from the arena and gave it back (~2,400 instructions a new
/// connection).
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: &[u8; 23] = b"slab_sizes:8192-8192:8\0";

/// The one function the agent took from the C maths library (tokio's multi-thread scheduler
/// weighs its poll times with it), here so that `libm.so.6` is not loaded at all: mapping it
/// kept ~330 KiB resident for one function.
#[no_mangle]
pub extern "C" fn pow(base: f64, exponent: f64) -> f64 {
    libm::pow(base, exponent)
}

/// Node agent of a sidecarless service mesh: eBPF hands enrolled pods' connections to it, and it
/// forwards them to where they were going.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up the redirect (eBPF programs, or iptables rules with --redirect iptables), enroll
    /// pods and proxy their connections until SIGTERM, or take over from an agent already
    /// running (see --handover-socket).
    #[command(after_help = "Examples:
  mesh-agent run --enroll client                  # netns /var/run/netns/client
  mesh-agent run --enroll web=/proc/4242/ns/net --access-log
  mesh-agent run --cgroup /sys/fs/cgroup/kubepods.slice --admin 127.0.0.1:15000
  mesh-agent run --redirect iptables --enroll client   # kernel without cgroup BPF hooks

Upgrade without dropping a connection: start the new agent beside the running one; it takes
over through the handover socket (same --cgroup, --listen and --redirect), then stop the old:
  mesh-agent-new run --enroll client & sleep 1; kill -TERM <old agent pid>

Enroll or unenroll at run time through the admin socket (root only; the TCP address only reads):
  curl --unix-socket /run/mesh-agent/admin.sock -XPOST localhost/pods \\
    -d '{\"name\":\"client\",\"netns\":\"/var/run/netns/client\"}'
  curl --unix-socket /run/mesh-agent/admin.sock -XDELETE localhost/pods/client")]
    Run(Box<RunArgs>),
    /// Apply Istio/Kubernetes objects to a running agent (local mode), like `kubectl apply -f`.
    /// All objects of a file take effect together, or none if any is invalid. Goes through the
    /// agent's admin socket: run it as root.
    #[command(after_help = "Examples:
  mesh-agent apply -f deploy/examples/destination-rules.yml
  mesh-agent apply -f deploy/examples/canary/2-vs-v1_and_v2_90_10.yml")]
    Apply(ChangeArgs),
    /// Delete the objects named in files from a running agent (local mode), as root.
    Delete(ChangeArgs),
    /// List the objects in force: `get vs`, `get dr service-c -o yaml`, `get all`.
    Get {
        /// Kind: VirtualService (vs), DestinationRule (dr), Gateway (gw), Service (svc),
        /// EndpointSlice, Pod, or `all`.
        kind: String,
        name: Option<String>,
        /// `yaml` prints the objects; otherwise a table.
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Check VirtualService/DestinationRule/Gateway (and Service/EndpointSlice/Pod) files without
    /// starting anything: prints every error and warning, exits 1 on any error.
    #[command(after_help = "Examples:
  mesh-agent validate -f deploy/examples/canary/2-vs-v1_and_v2_90_10.yml
  mesh-agent validate -f deploy/examples/destination-rules.yml -f deploy/examples/canary/")]
    Validate {
        /// A file or a folder (read recursively); repeat to validate several as one set.
        #[arg(
            short = 'f',
            long = "filename",
            value_name = "FILE|DIR",
            required = true
        )]
        files: Vec<PathBuf>,
    },
    /// Requests per second, each version's share of its service, success rate, p50 and p99,
    /// per service and version, as this node's pods sent them over the last SECONDS (from the
    /// agent's own metrics, through its admin socket: run it as root).
    #[command(after_help = "Examples:
  mesh-agent stat                 # the last 10 s, once
  mesh-agent stat -w              # refreshed every second, over the last 10 s
  mesh-agent stat --seconds 60 -w
  kubectl -n sidecarless-system exec <agent pod> -- mesh-agent stat")]
    Stat {
        /// The window.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
        /// Keep watching: redraw every second.
        #[arg(short = 'w', long)]
        watch: bool,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// The mesh's certificate authority: the root that signs workload certificates for mutual
    /// TLS between agents (local mode: `init`), and Kubernetes mode's signer (`serve`).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new root CA in DIR; refuses to overwrite an existing one.
    ///
    /// Writes, in DIR (created if missing, mode 0700): ca-key.pem (the root's ECDSA P-256 key,
    /// mode 0600), ca-cert.pem (its self-signed certificate, valid 10 years) and root-cert.pem
    /// (the trust bundle). Keep DIR on the nodes only, readable by root only: whoever reads
    /// ca-key.pem can impersonate any workload.
    #[command(after_help = "Examples:
  mesh-agent ca init /etc/mesh/ca
  mesh-agent ca init /etc/mesh/ca --trust-domain prod.example.com

Rotating the root: make a new CA in another folder, append the old ca-cert.pem to the new
root-cert.pem (both roots trusted), point the agents at the new folder, and remove the old root
from root-cert.pem once every certificate it signed has expired (24 h).")]
    Init {
        /// The folder for the CA's files.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The trust domain of the mesh's SPIFFE IDs
        /// (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>).
        #[arg(long, default_value = mesh_agent::identity::spiffe::DEFAULT_TRUST_DOMAIN, value_parser = parse_trust_domain)]
        trust_domain: TrustDomain,
    },
    /// Kubernetes mode's signer: approve and sign, or deny, the agents' workload
    /// CertificateSigningRequests (signerName sidecarless.io/workload) with the CA in DIR.
    ///
    /// A CSR is signed only if it comes from an agent pod (the agents' ServiceAccount, with a
    /// pod-bound token) and a pod of the SPIFFE ID's namespace and service account runs on that
    /// agent's node: a node's agent never obtains another node's workload identities. Denials
    /// name what failed (`kubectl describe csr`). Also publishes DIR's root-cert.pem in the
    /// ConfigMap mesh-ca-root-cert of the agents' namespace. Runs until stopped.
    #[command(after_help = "Examples:
  mesh-agent ca serve /etc/mesh/ca
  mesh-agent ca serve /etc/mesh/ca --kubeconfig ~/.kube/config --agent-namespace mesh")]
    Serve {
        /// The CA folder `ca init` made (in the Deployment, the mounted Secret).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Kubeconfig [default: in-cluster, then $KUBECONFIG, ~/.kube/config].
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// The agents' namespace: their ServiceAccount's, and where the trust bundle goes.
        #[arg(long, default_value = "sidecarless-system")]
        agent_namespace: String,
        /// The agents' ServiceAccount: the only requester whose CSRs are signed.
        #[arg(long, default_value = "mesh-agent")]
        agent_service_account: String,
        /// Hours a signed certificate is valid (agents renew at half life).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=720))]
        lifetime_hours: u64,
    },
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
struct RunArgs {
    /// How enrolled pods' connections reach the agent.
    #[arg(long, value_enum, default_value_t = Redirect::Ebpf)]
    redirect: Redirect,
    /// cgroup v2 directory to attach to [default: root of the cgroup2 mount in /proc/mounts].
    /// eBPF mode only; ignored with --redirect iptables.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Experimental: hand bytes between an enrolled pod's socket and the agent's in-pod socket
    /// directly (sockmap + sk_msg) instead of through loopback TCP. eBPF mode only. Off by
    /// default: on this kernel a pod reading with a blocking socket gets a spurious EAGAIN
    /// when woken without data, e.g. after shutting its write side (docs/architecture.md).
    #[arg(long)]
    socket_fast_path: bool,
    /// With mutual TLS (--ca, --mutual-tls) in eBPF mode, what arrives at each enrolled pod is
    /// captured too (an sk_lookup program on its network namespace), so that plaintext meets
    /// the pod's PeerAuthentication and AuthorizationPolicies. Those programs are pinned here,
    /// on a BPF filesystem, so that STRICT pods keep refusing plaintext while the agent is down.
    /// `rm -r` the directory on every node to remove them after uninstalling.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/mesh")]
    bpf_pin_dir: PathBuf,
    /// Pod to enroll: NETNS_NAME, NETNS_PATH or NAME=NETNS_PATH. Repeatable.
    #[arg(long, value_name = "POD", value_parser = PodSpec::parse)]
    enroll: Vec<PodSpec>,
    /// Where the agent listens inside each enrolled pod's network namespace.
    #[arg(long, default_value_t = SocketAddrV4::new([127, 0, 0, 1].into(), DEFAULT_LISTEN_PORT))]
    listen: SocketAddrV4,
    /// Admin API's TCP address, in the agent's namespace. Local mode: reads only (health,
    /// readiness, metrics, the /graph page, stats, config_dump, pods); changes answer 403.
    /// Kubernetes mode: the kubelet's probes, Prometheus and the graph only (/healthz, /ready,
    /// /metrics, /graph).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[command(flatten)]
    admin_socket: AdminSocketArg,
    /// Zero-downtime restarts: an agent already running on this socket hands its listeners,
    /// pods and kernel state over to this one, which then serves them without dropping a
    /// connection (the old agent drains and waits for SIGTERM). Without one this agent starts
    /// afresh, and listens here for its own successor. Mode 0600: root only.
    #[arg(long, value_name = "PATH", default_value = mesh_agent::handover::DEFAULT_PATH)]
    handover_socket: PathBuf,
    /// iptables mode only: the socket mark on the agent's own connections, which the rules let
    /// pass (a pod with NET_ADMIN can set it too; eBPF mode exempts the agent's sockets by
    /// cookie instead).
    #[arg(long, default_value_t = DEFAULT_AGENT_MARK, value_parser = parse_u32)]
    mark: u32,
    /// Data-path worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Print one JSON line per proxied connection on stdout.
    #[arg(long)]
    access_log: bool,
    /// Seconds connections in flight may take to finish after SIGTERM, or after a successor
    /// took over.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// Local mode: a folder of Service, EndpointSlice, Pod, VirtualService, DestinationRule and
    /// Gateway YAML. Watched: changes apply within a second; invalid ones are rejected.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Export a span per proxied request over OTLP/HTTP to this collector (Jaeger accepts it),
    /// e.g. http://jaeger-collector:4318. Tracing headers are propagated either way.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Local mode: the CA made by `mesh-agent ca init DIR`. With it, connections between pods
    /// in the mesh (label sidecarless.io/mesh: enabled) go through mutual TLS tunnels (HBONE:
    /// HTTP/2 CONNECT on each pod's port 15008), each pod presenting a certificate of its
    /// SPIFFE ID minted from this CA; without it, every connection is plaintext.
    #[arg(long, value_name = "DIR")]
    ca: Option<PathBuf>,
    /// Kubernetes mode: connections between pods in the mesh go through mutual TLS tunnels, as
    /// with --ca, with certificates from the mesh's signer (`mesh-agent ca serve`), asked for
    /// with CertificateSigningRequests made with --token-file. The DaemonSet sets it.
    #[arg(long, requires = "kubernetes", conflicts_with = "ca")]
    mutual_tls: bool,
    /// The agent pod's pod-bound ServiceAccount token (a projected volume): the credentials of
    /// its CSRs, which tie each request to this pod and so to this node.
    #[arg(long, value_name = "FILE", requires = "mutual_tls", default_value = csr::DEFAULT_TOKEN_FILE)]
    token_file: PathBuf,
    /// Kubernetes mode: watch services, endpoints, pods, namespaces and Istio rules on the API
    /// server, and enroll this node's pods labelled `sidecarless.io/mesh: enabled` (or in a
    /// namespace so labelled).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig for Kubernetes mode [default: in-cluster, then $KUBECONFIG, ~/.kube/config].
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (only its pods are enrolled).
    #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
    node_name: Option<String>,
    /// Where the host's /proc is visible (the DaemonSet mounts it at /host/proc).
    #[arg(long, default_value = "/proc", value_name = "DIR")]
    proc_root: PathBuf,
    /// Serve the mesh's ingress gateway on this address: requests are routed by Istio
    /// `Gateway`s and the `VirtualService`s bound to them (`gateways:`), e.g. 0.0.0.0:80.
    #[arg(long, value_name = "ADDR")]
    ingress: Option<SocketAddr>,
    /// A label of the ingress gateway: it serves the Gateways whose `selector` its labels
    /// satisfy. Repeatable; replaces the default labels, those of Istio's own ingress gateway
    /// (istio=ingressgateway, app=istio-ingressgateway).
    #[arg(long = "gateway-label", value_name = "KEY=VALUE", value_parser = GatewayLabels::parse_label)]
    gateway_labels: Vec<(String, String)>,
    /// Share of new traces sampled (0.0 to 1.0); a caller's decision is always kept.
    #[arg(long, default_value_t = 1.0)]
    trace_sample_ratio: f64,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The data path's bounds (docs/reliability.md says why each default).
#[derive(clap::Args)]
#[command(next_help_heading = "Limits")]
struct LimitArgs {
    /// Seconds a new HTTP connection has to send its first request head or HTTP/2 preface
    /// (and an HTTP/1 keep-alive connection the rest of a head it has begun).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), default_value_t = limits::DEFAULT_HTTP_HEADER_TIMEOUT.as_secs())]
    http_header_timeout: u64,
    /// Seconds an HTTP connection (HTTP/1 keep-alive or HTTP/2) may stay open with no request
    /// in flight.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), default_value_t = limits::DEFAULT_HTTP_IDLE_TIMEOUT.as_secs())]
    http_idle_timeout: u64,
    /// Seconds between keep-alive pings on an HTTP/2 client connection.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), default_value_t = limits::DEFAULT_H2_KEEPALIVE_INTERVAL.as_secs())]
    h2_keepalive_interval: u64,
    /// Seconds a keep-alive ping's answer may take before the connection is closed.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), default_value_t = limits::DEFAULT_H2_KEEPALIVE_TIMEOUT.as_secs())]
    h2_keepalive_timeout: u64,
    /// Seconds opaque TCP may go without a byte either way (a DestinationRule's
    /// `connectionPool.tcp.idleTimeout` overrides it for its service).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), default_value_t = limits::DEFAULT_TCP_IDLE_TIMEOUT.as_secs())]
    tcp_idle_timeout: u64,
    /// Downstream connections held at once, all pods together; more are closed at once.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Downstream connections one pod may hold at once; more are closed at once.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_CONNECTIONS_PER_POD)]
    max_connections_per_pod: usize,
    /// Request-body bytes one connection may hold buffered for retries; past it, streamed.
    #[arg(long, value_name = "BYTES", default_value_t = limits::DEFAULT_BODY_BUFFER_PER_CONNECTION)]
    body_buffer_per_connection: usize,
    /// Request-body bytes all connections may hold buffered for retries; past it, streamed.
    #[arg(long, value_name = "BYTES", default_value_t = limits::DEFAULT_BODY_BUFFER_GLOBAL)]
    body_buffer: usize,
    /// Mirrored copies in flight, all pods together; more are dropped (and counted).
    #[arg(long, default_value_t = limits::DEFAULT_MAX_MIRRORS_IN_FLIGHT)]
    max_mirrors_in_flight: usize,
}

impl From<LimitArgs> for limits::Limits {
    fn from(args: LimitArgs) -> Self {
        limits::Limits {
            http_header_timeout: Duration::from_secs(args.http_header_timeout),
            http_idle_timeout: Duration::from_secs(args.http_idle_timeout),
            h2_keepalive_interval: Duration::from_secs(args.h2_keepalive_interval),
            h2_keepalive_timeout: Duration::from_secs(args.h2_keepalive_timeout),
            tcp_idle_timeout: Duration::from_secs(args.tcp_idle_timeout),
            max_connections: args.max_connections,
            max_connections_per_pod: args.max_connections_per_pod,
            body_buffer_per_connection: args.body_buffer_per_connection,
            body_buffer_global: args.body_buffer,
            max_mirrors_in_flight: args.max_mirrors_in_flight,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Redirect {
    /// cgroup connect4/sockops eBPF programs: fail-open if the agent is down, no conntrack.
    Ebpf,
    /// iptables REDIRECT in each enrolled pod's netns, original destination from conntrack
    /// (SO_ORIGINAL_DST). The fallback for kernels without cgroup BPF hooks; needs
    /// iptables-restore on PATH; fails closed while the agent is down.
    Iptables,
}

impl From<Redirect> for RedirectMode {
    fn from(redirect: Redirect) -> Self {
        match redirect {
            Redirect::Ebpf => RedirectMode::Ebpf,
            Redirect::Iptables => RedirectMode::Iptables,
        }
    }
}

#[derive(clap::Args)]
struct ChangeArgs {
    /// A file or a folder of YAML/JSON; repeatable, applied in order.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR",
        required = true
    )]
    files: Vec<PathBuf>,
    #[command(flatten)]
    admin: AdminSocketArg,
}

#[derive(clap::Args)]
struct AdminSocketArg {
    /// The admin API's Unix socket: all of it, and in local mode the only way to change
    /// anything (apply, delete, enroll, log level). Created mode 0600: root only.
    #[arg(
        long = "admin-socket",
        env = "MESH_ADMIN_SOCKET",
        value_name = "PATH",
        default_value = mesh_agent::admin::DEFAULT_SOCKET_PATH
    )]
    path: PathBuf,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours for a terminal only: not in a file, a pipe or `kubectl logs`.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let log_level: mesh_agent::admin::LogLevelSetter = Box::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        filter_handle.reload(filter).map_err(|e| e.to_string())
    });
    let result = match Cli::parse().command {
        Command::Validate { files } => {
            return match mesh_agent::config::run_validate(&files, &mut std::io::stdout()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(error) => {
                    eprintln!("mesh-agent: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => mesh_agent::cli::ca_init(&dir, trust_domain),
        Command::Ca {
            command:
                CaCommand::Serve {
                    dir,
                    kubeconfig,
                    agent_namespace,
                    agent_service_account,
                    lifetime_hours,
                },
        } => mesh_agent::cli::ca_serve(
            &dir,
            kubeconfig,
            mesh_agent::identity::signer::SignerSettings {
                agent_namespace,
                agent_service_account,
                lifetime: Duration::from_secs(lifetime_hours * 3600),
            },
        ),
        Command::Stat {
            seconds,
            watch,
            admin,
        } => mesh_agent::cli::stat(&admin.path, Duration::from_secs(seconds), watch),
        Command::Apply(args) => mesh_agent::cli::change(&args.admin.path, &args.files, false),
        Command::Delete(args) => mesh_agent::cli::change(&args.admin.path, &args.files, true),
        Command::Get {
            kind,
            name,
            output,
            admin,
        } => mesh_agent::cli::get(
            &admin.path,
            &kind,
            name.as_deref(),
            output.as_deref() == Some("yaml"),
        ),
        Command::Run(args) => {
            let kubernetes = match (args.kubernetes, args.node_name) {
                (false, _) => None,
                (true, Some(node_name)) => Some(KubeSettings {
                    kubeconfig: args.kubeconfig,
                    node_name,
                    proc_root: args.proc_root,
                }),
                (true, None) => {
                    eprintln!("mesh-agent: --kubernetes needs --node-name (or NODE_NAME)");
                    return ExitCode::FAILURE;
                }
            };
            run::run(run::Settings {
                redirect: args.redirect.into(),
                cgroup: args.cgroup,
                socket_fast_path: args.socket_fast_path,
                bpf_pin_dir: args.bpf_pin_dir,
                enroll: args.enroll,
                listen: args.listen,
                admin: args.admin,
                admin_socket: args.admin_socket.path,
                handover_socket: args.handover_socket,
                agent_mark: args.mark,
                workers: args.workers.max(1),
                access_log: args.access_log,
                drain: Duration::from_secs(args.drain_seconds),
                config: args.config,
                otlp_endpoint: args.otlp_endpoint,
                mutual_tls: match (args.ca, args.mutual_tls) {
                    (Some(dir), _) => Some(run::MutualTls::LocalCa(dir)),
                    (None, true) => Some(run::MutualTls::Signer {
                        token_file: args.token_file,
                    }),
                    (None, false) => None,
                },
                trace_sample_ratio: args.trace_sample_ratio.clamp(0.0, 1.0),
                ingress: args.ingress,
                gateway_labels: if args.gateway_labels.is_empty() {
                    GatewayLabels::default()
                } else {
                    GatewayLabels::new(args.gateway_labels)
                },
                kubernetes,
                log_level: Some(log_level),
                limits: args.limits.into(),
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use tikv_jemalloc_ctl::raw;

    /// `JEMALLOC_OPTIONS` reached jemalloc: its 8 KiB bin cuts slabs of four.
    #[test]
    fn jemalloc_puts_four_8_kib_buffers_in_a_slab() {
        // SAFETY: each name is a NUL-terminated jemalloc control of the type read.
        let bins: u32 = unsafe { raw::read(b"arenas.nbins\0") }.unwrap();
        let size = |bin: u32| -> usize {
            let name = format!("arenas.bin.{bin}.size\0");
            // SAFETY: as above.
            unsafe { raw::read(name.as_bytes()) }.unwrap()
        };
        let bin = (0..bins).find(|&bin| size(bin) == 8192).unwrap();
        let name = format!("arenas.bin.{bin}.nregs\0");
        // SAFETY: as above.
        let regions: u32 = unsafe { raw::read(name.as_bytes()) }.unwrap();
        assert_eq!(regions, 4);
    }
}
