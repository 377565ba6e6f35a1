//! Fault injection (`fault.delay`, `fault.abort`): which requests are delayed (`DI`) or
//! aborted (`FI`). Delay and abort are decided independently, each on its own exact spread
//! (see `split::Spread`); a request chosen for both is delayed, then aborted, as Envoy's fault
//! filter does.

use std::time::Duration;

use super::split::Spread;
use crate::config::model::Fault;

#[derive(Debug)]
pub(crate) struct FaultRule {
    config: Fault,
    delays: Spread,
    aborts: Spread,
}

/// What fault injection chose for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FaultDecision {
    pub(crate) delay: Option<Duration>,
    pub(crate) abort: Option<u16>,
}

impl FaultRule {
    pub(crate) fn new(config: &Fault) -> Self {
        FaultRule {
            config: config.clone(),
            delays: Spread::default(),
            aborts: Spread::default(),
        }
    }

    pub(crate) fn decide(&self) -> FaultDecision {
        FaultDecision {
            delay: self
                .config
                .delay
                .as_ref()
                .filter(|d| self.delays.hit(d.percentage))
                .map(|d| d.fixed_delay),
            abort: self
                .config
                .abort
                .as_ref()
                .filter(|a| self.aborts.hit(a.percentage))
                .map(|a| a.http_status),
        }
    }
}
