//! Engine-wide settings, below every layer that reads them.

use std::time::Duration;

use super::gateway::GatewayLabels;
use super::retry::RetryBudget;

/// Engine-wide settings that are not part of Istio's API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// Retry budget per destination service. Default: 20% of requests + 3/s over 10 s.
    pub retry_budget: RetryBudget,
    /// Backoff base (Envoy: 25 ms).
    pub retry_base_interval: Duration,
    /// Backoff ceiling (Envoy: 10 × base = 250 ms).
    pub retry_max_interval: Duration,
    /// Largest request body the proxy buffers so the request can be retried (64 KiB).
    /// Larger or streamed bodies make the request non-replayable.
    pub max_replay_body: usize,
    /// When every endpoint of a cluster is ejected, route to all of them (panic) instead of
    /// failing with `UH`. Default `true` (see `docs/configuration.md`, Engine semantics).
    pub panic_when_all_ejected: bool,
    /// Seed for the per-request random generators.
    pub seed: u64,
    /// The labels of the agent's built-in ingress gateway: it serves the `Gateway`s whose
    /// selector they satisfy. Default `istio: ingressgateway`, `app: istio-ingressgateway`;
    /// `None`: the agent runs no ingress gateway (no `--ingress`) and serves no `Gateway`.
    pub gateway_labels: Option<GatewayLabels>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            retry_budget: RetryBudget::default(),
            retry_base_interval: Duration::from_millis(25),
            retry_max_interval: Duration::from_millis(250),
            max_replay_body: 64 * 1024,
            panic_when_all_ejected: true,
            seed: 0x5eed,
            gateway_labels: Some(GatewayLabels::default()),
        }
    }
}
