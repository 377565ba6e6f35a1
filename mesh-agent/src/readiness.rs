//! What `GET /ready` waits for. Each start-up step that may take a while (Kubernetes mode's API
//! discovery and first lists, the first enrollment) holds a named condition until it is done;
//! `/ready` answers 200 only when none is left, and otherwise names each one with the last
//! reason it gave, so `kubectl describe pod` says *why* an agent is not ready. Shutdown adds a
//! condition that never clears. `/healthz` does not look here: the agent is alive while it waits.

use std::{collections::BTreeMap, fmt::Write, sync::Mutex};

use tracing::info;

/// The condition every agent holds until `run` has attached its programs, loaded its config
/// and bound its listeners.
pub const START_UP: &str = "start-up";

pub struct Readiness {
    /// What is still awaited → what it is waiting on (the last error, or what is under way).
    pending: Mutex<BTreeMap<String, String>>,
}

impl Readiness {
    /// Not ready until [`START_UP`] is done.
    pub fn starting() -> Readiness {
        let pending = BTreeMap::from([(START_UP.to_owned(), "starting".to_owned())]);
        Readiness {
            pending: Mutex::new(pending),
        }
    }

    /// `what` is awaited, because of `why`; a later call replaces the reason.
    pub fn waiting(&self, what: &str, why: impl Into<String>) {
        let mut pending = self.lock();
        match pending.get_mut(what) {
            Some(reason) => *reason = why.into(),
            None => {
                pending.insert(what.to_owned(), why.into());
            }
        }
    }

    /// `what` is no longer awaited; the last one done makes the agent ready.
    pub fn done(&self, what: &str) {
        let mut pending = self.lock();
        if pending.remove(what).is_some() && pending.is_empty() {
            info!("ready");
        }
    }

    /// `Ok` when nothing is awaited; else what is, one `what (why)` per condition.
    pub fn check(&self) -> Result<(), String> {
        let pending = self.lock();
        if pending.is_empty() {
            return Ok(());
        }
        let mut waiting = String::new();
        for (what, why) in pending.iter() {
            if !waiting.is_empty() {
                waiting.push_str("; ");
            }
            let _ = write!(waiting, "{what} ({why})");
        }
        Err(waiting)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // A panic while holding it cannot leave the map half-changed: every change is one call.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_is_done_and_each_pending_one_says_why() {
        let readiness = Readiness::starting();
        assert_eq!(readiness.check(), Err("start-up (starting)".to_owned()));
        readiness.waiting("first list of EndpointSlice", "listing");
        readiness.waiting("first list of EndpointSlice", "last error: 404 Not Found");
        readiness.waiting("first list of Service", "listing");
        readiness.done(START_UP);
        assert_eq!(
            readiness.check(),
            Err("first list of EndpointSlice (last error: 404 Not Found); \
                 first list of Service (listing)"
                .to_owned())
        );
        readiness.done("first list of Service");
        readiness.done("first list of Service");
        readiness.done("first list of EndpointSlice");
        assert_eq!(readiness.check(), Ok(()));
        readiness.waiting("shutdown", "draining connections");
        assert_eq!(
            readiness.check(),
            Err("shutdown (draining connections)".to_owned())
        );
    }
}
