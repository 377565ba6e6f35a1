//! Mirroring: which requests are also copied to the mirror destination, per
//! `mirrorPercentage`, spread exactly (see `split::Spread`). The proxy sends the copy
//! fire-and-forget and ignores its answer; the engine only decides and picks the endpoint.

use super::cluster::Target;
use super::split::Spread;
use crate::config::model::Percent;

#[derive(Debug)]
pub(crate) struct MirrorRule {
    pub(crate) target: Target,
    percentage: Percent,
    spread: Spread,
}

impl MirrorRule {
    pub(crate) fn new(target: Target, percentage: Percent) -> Self {
        MirrorRule {
            target,
            percentage,
            spread: Spread::default(),
        }
    }

    /// Whether the next request is mirrored.
    pub(crate) fn decide(&self) -> bool {
        self.spread.hit(self.percentage)
    }
}
