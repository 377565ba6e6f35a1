//! The one store everything the data path reads comes from. Sources change a set of typed
//! objects — the config folder (local mode) or the API server's watches (Kubernetes mode) as
//! the base, `mesh-agent apply`/`delete` as an overlay on it — and the store puts the result in
//! force as one immutable [`Snapshot`]: indexed, compiled into the engine. The proxy loads the
//! current snapshot per request (lock-free); admin reads it.
//!
//! One bad object never holds up the rest: what a source holds that is invalid (an object that
//! fails validation, a file that does not parse) is rejected by itself and reported: logged once
//! (file, object, field, reason), counted (`mesh_config_rejected_objects{kind}`) and listed in
//! `/config_dump`. Per object, the last good version this agent saw stays in force (an edit that
//! breaks a running rule changes nothing it routes); an object this agent never saw valid — e.g.
//! one broken before a restart: nothing is persisted — is left out. Deleting an object deletes
//! it, last good version included. A destination naming a subset or host that does not exist
//! (yet) is a warning, not an error: objects arrive in any order. Only `apply` refuses, all or
//! nothing, as an admission check would. A change costs what it touches: only the objects that
//! differ are indexed again, and the engine is recompiled only when its input changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    authorization::{Authorization, PeerAuthentications},
    config::{
        self, model::MeshConfig, Diagnostic, Object, ObjectKey, ObjectSet, Rejection, Severity,
        Sourced,
    },
    discovery::{
        folder::{Contents, Folder},
        Discovered, Index, SourceChange,
    },
    engine::{Engine, EngineSettings, GatewayLabels},
};

/// Everything in force at one moment.
pub struct Snapshot {
    pub version: u64,
    pub engine: Engine,
    /// The AuthorizationPolicies in force, judged at each pod's destination.
    pub authorization: Arc<Authorization>,
    /// The PeerAuthentications in force: what each pod accepts, mutual TLS or plaintext.
    pub peer_authentication: Arc<PeerAuthentications>,
    pub discovered: Discovered,
    /// Every object in force, for `get` and `/config_dump`.
    pub objects: ObjectSet,
    /// What the sources hold that is invalid, each with why and what of it is in force (for
    /// `/config_dump`).
    pub rejected: Arc<[Rejected]>,
    /// Warnings that span objects: destinations naming a subset or host that does not exist.
    references: Arc<[Diagnostic]>,
}

impl Snapshot {
    /// What is worth a warning in the objects in force, and between them.
    pub fn warnings(&self) -> Vec<Diagnostic> {
        let labels = self.engine.settings().gateway_labels.as_ref();
        self.objects
            .values()
            .flat_map(|o| warnings(o, labels))
            .chain(self.references.iter().cloned())
            .collect()
    }

    /// The warnings about one object in force (none if it is not in force).
    pub fn warnings_of(&self, key: &ObjectKey) -> Vec<Diagnostic> {
        let labels = self.engine.settings().gateway_labels.as_ref();
        let Some(object) = self.objects.get(key) else {
            return Vec::new();
        };
        let label = key.to_string();
        let mut found = warnings(object, labels);
        found.extend(
            self.references
                .iter()
                .filter(|d| d.object == label)
                .cloned(),
        );
        found
    }

    /// The objects in force that have no effect at all, each with the reason: kinds of Istio's
    /// API groups the mesh does not implement, and Gateways the agent's ingress does not serve.
    pub fn ignored(&self) -> impl Iterator<Item = (&Sourced, String)> {
        let labels = self.engine.settings().gateway_labels.as_ref();
        self.objects
            .values()
            .filter_map(move |o| Some((&**o, ignored(o, labels)?)))
    }
}

/// Why an object in force has no effect, if it has none. `labels`: the ingress gateway's, `None`
/// when the agent runs none.
fn ignored(object: &Sourced, labels: Option<&GatewayLabels>) -> Option<String> {
    let Object::Gateway(gateway) = &object.object else {
        return object.ignored();
    };
    let Some(labels) = labels else {
        return Some("this agent runs no ingress gateway (run --ingress): not served".to_owned());
    };
    if labels.selects(&gateway.rule.selector) {
        return None;
    }
    let selector: Vec<String> = gateway
        .rule
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Some(format!(
        "selector {} does not match the labels of this agent's ingress gateway ({labels}): \
         not served",
        selector.join(", ")
    ))
}

/// An object's warnings: those its reading found, and that the ingress does not serve it.
fn warnings(object: &Sourced, labels: Option<&GatewayLabels>) -> Vec<Diagnostic> {
    let mut warnings = object.warnings.clone();
    if matches!(object.object, Object::Gateway(_)) {
        warnings.extend(ignored(object, labels).map(|reason| {
            Diagnostic {
                severity: Severity::Warning,
                file: object.origin.to_string(),
                object: object.key.to_string(),
                // Without an ingress there is nothing in the object to fix.
                field: if labels.is_some() {
                    "spec.selector"
                } else {
                    ""
                }
                .to_owned(),
                reason,
            }
        }));
    }
    warnings
}

/// Something a source holds that is invalid, and what of it is in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub rejection: Arc<Rejection>,
    pub outcome: Outcome,
}

/// What of a rejected object is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The last good version this agent saw stays in force (for a file that cannot be read or
    /// parsed: the objects it last held).
    LastGoodInForce,
    /// Nothing: this agent never saw a valid version (since it started), or the valid
    /// definition in force is another one (an object defined again in a later file).
    LeftOut,
}

impl Outcome {
    /// As `/config_dump` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::LastGoodInForce => "last_good_in_force",
            Outcome::LeftOut => "left_out",
        }
    }
}

/// The store's metrics, under the caller's prefix (`mesh_config_`).
#[derive(Debug, Default)]
pub struct ConfigMetrics {
    /// `reloads_total{result}`: changes put in force (`ok`), and `apply`/`delete` requests or
    /// folder reads refused whole (`rejected`: nothing changed).
    pub ok: Counter,
    pub rejected: Counter,
    /// `rejected_objects{kind}`: what the sources hold that is invalid right now.
    rejected_objects: Family<[(&'static str, &'static str); 1], Gauge>,
}

impl ConfigMetrics {
    fn registered(registry: &mut Registry) -> ConfigMetrics {
        let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "reloads",
            "Config changes, put in force (ok) or refused whole (rejected)",
            family.clone(),
        );
        let ok = family.get_or_create(&[("result", "ok")]).clone();
        let rejected = family.get_or_create(&[("result", "rejected")]).clone();
        let rejected_objects = Family::default();
        registry.register(
            "rejected_objects",
            "Objects (or unreadable files: kind=\"unknown\") the sources hold in an invalid \
             version, by kind: each rejected, its last good version kept in force or, if this \
             agent saw none, left out",
            rejected_objects.clone(),
        );
        ConfigMetrics {
            ok,
            rejected,
            rejected_objects,
        }
    }

    /// Sets `rejected_objects` to what `rejected` holds, every kind (0 for none).
    fn count_rejected<'a>(&self, rejected: impl Iterator<Item = &'a Rejected>) {
        let mut counts = [0i64; config::COUNTED_KINDS.len()];
        for rejected in rejected {
            let kind = rejected.rejection.counted_kind();
            if let Some(i) = config::COUNTED_KINDS.iter().position(|k| *k == kind) {
                counts[i] += 1;
            }
        }
        for (kind, count) in config::COUNTED_KINDS.into_iter().zip(counts) {
            self.rejected_objects
                .get_or_create(&[("kind", kind)])
                .set(count);
        }
    }
}

/// How many source changes one compile takes at most; a longer burst is compiled in steps.
const MAX_BATCH: usize = 1024;
/// A burst of watch events is compiled once: wait this long for the rest of it.
const COALESCE: Duration = Duration::from_millis(20);

pub struct Store {
    current: ArcSwap<Snapshot>,
    state: Mutex<State>,
    pub reloads: ConfigMetrics,
    /// The AuthorizationPolicies in force, sent each time they change: what was judged under
    /// the old ones is judged again.
    authorization: tokio::sync::watch::Sender<Arc<Authorization>>,
    /// The version of each snapshot put in force.
    versions: tokio::sync::watch::Sender<u64>,
}

/// What a source holds that is invalid, by source and identity (see [`Rejection::id`]).
type Rejections = BTreeMap<(Arc<str>, String), Rejected>;

/// What the sources want, and what is in force.
struct State {
    folder: Option<Folder>,
    /// The source's objects (the folder's, or the API server's): each valid one it holds, and
    /// for one it holds in an invalid version the last good version seen, if any.
    base: ObjectSet,
    /// What the source holds that is invalid: reported.
    rejected: Rejections,
    /// Applied objects; they replace the base's of the same identity.
    applied: ObjectSet,
    /// Deleted base objects, hidden until applied again or the agent restarts.
    deleted: imbl::OrdSet<ObjectKey>,
    in_force: InForce,
    /// The ingress gateway's labels (`None`: no ingress), which decide whether a Gateway is
    /// worth a warning.
    gateway_labels: Option<GatewayLabels>,
}

/// The objects in force and what was derived from them.
#[derive(Clone, Default)]
struct InForce {
    objects: ObjectSet,
    index: Index,
    config: MeshConfig,
    authorization: Arc<Authorization>,
    peer_authentication: Arc<PeerAuthentications>,
    /// What the VirtualServices in force name that does not exist.
    references: Arc<[Diagnostic]>,
}

/// What a change puts in force.
struct Accepted {
    next: InForce,
    /// Whether the engine's input changed.
    recompile: bool,
    /// Warnings the objects it brings in did not have in force already: each is logged once,
    /// when an object appears or its warnings change, not again on every reload or relist.
    warnings: Vec<Diagnostic>,
}

impl Store {
    /// Loads the folder (if any): its valid objects are put in force, what is invalid is left
    /// out (no good version of it was seen yet) and reported. Fails only when the folder itself
    /// cannot be read. The store's metrics (`mesh_config_*`) and the engine's (`mesh_engine_*`,
    /// per-service counters) are registered on `registry`, the agent's `mesh` sub-registry.
    pub fn open(
        dir: Option<PathBuf>,
        settings: EngineSettings,
        registry: &mut Registry,
    ) -> Result<Store, Diagnostic> {
        let mut folder = dir.map(Folder::new);
        let contents = match &mut folder {
            Some(folder) => folder.read()?,
            None => Default::default(),
        };
        let (base, rejected) = with_last_good(&ObjectSet::new(), contents);
        let mut state = State {
            folder,
            base,
            rejected,
            applied: ObjectSet::new(),
            deleted: imbl::OrdSet::new(),
            in_force: InForce::default(),
            gateway_labels: settings.gateway_labels.clone(),
        };
        let keys: Vec<ObjectKey> = state.base.keys().cloned().collect();
        let accepted = state.check(keys);
        log_warnings(&accepted.warnings);
        log_rejections(&Rejections::new(), &state.rejected);
        let engine = Engine::new(
            &accepted.next.config,
            &accepted.next.index.registry(),
            settings,
            Instant::now(),
        );
        engine.shared_metrics().register(registry);
        let snapshot = state.put_in_force(accepted.next, 1, engine);
        let reloads = ConfigMetrics::registered(registry.sub_registry_with_prefix("config"));
        reloads.ok.inc();
        reloads.count_rejected(snapshot.rejected.iter());
        Ok(Store {
            authorization: tokio::sync::watch::Sender::new(Arc::clone(&snapshot.authorization)),
            versions: tokio::sync::watch::Sender::new(snapshot.version),
            current: ArcSwap::from_pointee(snapshot),
            state: Mutex::new(state),
            reloads,
        })
    }

    /// The snapshot in force. Cheap: an atomic load and an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Told each time the AuthorizationPolicies in force change.
    pub fn authorization_changes(&self) -> tokio::sync::watch::Receiver<Arc<Authorization>> {
        self.authorization.subscribe()
    }

    /// Told each time a new snapshot is in force: what depends on more than one of its parts
    /// (a pod's PeerAuthentication mode: the policies, and the pod's labels from discovery)
    /// looks again.
    pub fn versions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// The config folder, if the store reads one.
    pub fn folder(&self) -> Option<PathBuf> {
        self.lock().folder.as_ref().map(|f| f.dir().to_path_buf())
    }

    /// Re-reads the folder and puts what it holds in force; for what is invalid in it, the last
    /// good version stays (or, if there is none, it is left out). Fails, and the current
    /// snapshot stays, only when the folder cannot be read at all.
    pub fn reload(&self) -> Result<u64, Diagnostic> {
        let mut state = self.lock();
        let Some(folder) = &mut state.folder else {
            return Ok(self.current.load().version);
        };
        match folder.read() {
            Ok(contents) => {
                let (base, rejected) = with_last_good(&state.base, contents);
                let touched = changed_keys(&state.base, &base);
                let before = std::mem::replace(&mut state.rejected, rejected);
                state.base = base;
                let version = self.settle(&mut state, touched, &before);
                self.reloads.ok.inc();
                Ok(version)
            }
            Err(error) => {
                self.reloads.rejected.inc();
                warn!("config folder not read, the config in force stays: {error}");
                Err(error)
            }
        }
    }

    /// Kubernetes mode: what the API server's watches reported. Always taken: for an invalid
    /// object the last good version stays (or, if there is none, it is left out), by itself.
    pub fn change(&self, changes: Vec<SourceChange>) -> u64 {
        let mut state = self.lock();
        let before = state.rejected.clone();
        let mut touched = Vec::new();
        for change in changes {
            match change {
                SourceChange::Upsert(sourced) => {
                    state.forget_rejection(&sourced.key);
                    touched.push(sourced.key.clone());
                    state.base.insert(sourced.key.clone(), sourced);
                }
                SourceChange::Reject(rejection) => {
                    // What is in force of it is the last good version: it stays.
                    let kept = (rejection.key.as_ref()).is_some_and(|k| state.base.contains_key(k));
                    state.reject(rejection, kept);
                }
                SourceChange::Remove(key) => {
                    state.forget_rejection(&key);
                    state.base.remove(&key);
                    touched.push(key);
                }
                SourceChange::Replace {
                    kind,
                    objects,
                    rejected,
                } => {
                    let mut replacement = ObjectSet::new();
                    for sourced in objects {
                        replacement.insert(sourced.key.clone(), sourced);
                    }
                    // Listed but invalid: not gone, their last good versions stay (a relist,
                    // after `410 Gone` say, must not drop them).
                    let invalid: BTreeSet<&ObjectKey> =
                        rejected.iter().filter_map(|r| r.key.as_ref()).collect();
                    let gone: Vec<ObjectKey> = config::of_kind(&state.base, &kind)
                        .map(|o| o.key.clone())
                        .filter(|key| !replacement.contains_key(key) && !invalid.contains(key))
                        .collect();
                    for key in gone {
                        state.base.remove(&key);
                        touched.push(key);
                    }
                    for (key, sourced) in replacement {
                        touched.push(key.clone());
                        state.base.insert(key, sourced);
                    }
                    state.rejected.retain(|_, r| {
                        (r.rejection.key.as_ref()).is_none_or(|key| key.kind != kind)
                    });
                    for rejection in rejected {
                        let kept =
                            (rejection.key.as_ref()).is_some_and(|k| state.base.contains_key(k));
                        state.reject(rejection, kept);
                    }
                }
            }
        }
        let version = self.settle(&mut state, touched, &before);
        self.reloads.ok.inc();
        version
    }

    /// Kubernetes mode: puts what the watches report in force until they end, a burst of
    /// events at a time.
    pub async fn follow(self: Arc<Self>, mut changes: mpsc::Receiver<SourceChange>) {
        let mut batch = Vec::new();
        while changes.recv_many(&mut batch, MAX_BATCH).await > 0 {
            tokio::time::sleep(COALESCE).await;
            while batch.len() < MAX_BATCH {
                match changes.try_recv() {
                    Ok(change) => batch.push(change),
                    Err(_) => break,
                }
            }
            let store = Arc::clone(&self);
            let changes = std::mem::take(&mut batch);
            // Compiling takes milliseconds at worst: off the data path's threads.
            let _ = tokio::task::spawn_blocking(move || store.change(changes)).await;
        }
    }

    /// `mesh-agent apply -f`: all objects of `text` or none. An object with an error refuses
    /// the whole request, as an admission check would; a destination naming what does not
    /// exist yet is only a warning.
    pub fn apply(&self, label: &str, text: &str) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        let objects = config::read_text(label, text);
        let mut state = self.lock();
        let result = objects.map(|objects| {
            let mut keys = Vec::new();
            for sourced in objects {
                state.deleted.remove(&sourced.key);
                keys.push(sourced.key.clone());
                state.applied.insert(sourced.key.clone(), Arc::new(sourced));
            }
            let unchanged = state.rejected.clone();
            (self.settle(&mut state, keys.clone(), &unchanged), keys)
        });
        self.count(result)
    }

    /// `mesh-agent delete -f`: the objects named in `text` (only kind, namespace and name
    /// matter); one that does not exist is an error and nothing changes.
    pub fn delete(
        &self,
        label: &str,
        text: &str,
    ) -> Result<(u64, Vec<ObjectKey>), Vec<Diagnostic>> {
        let keys = keys_of(label, text);
        let mut state = self.lock();
        let result = keys.and_then(|keys| {
            let missing: Vec<Diagnostic> = keys
                .iter()
                .filter(|key| {
                    let in_base = state.base.contains_key(*key) && !state.deleted.contains(*key);
                    !state.applied.contains_key(*key) && !in_base
                })
                .map(|key| Diagnostic::error(label, &key.to_string(), "not found"))
                .collect();
            if !missing.is_empty() {
                return Err(missing);
            }
            for key in &keys {
                state.applied.remove(key);
                if state.base.contains_key(key) {
                    state.deleted.insert(key.clone());
                }
            }
            let unchanged = state.rejected.clone();
            Ok((self.settle(&mut state, keys.clone(), &unchanged), keys))
        });
        self.count(result)
    }

    /// Puts in force what `touched` changed; `before` is what was rejected until now, so that
    /// only new rejections are logged.
    fn settle(&self, state: &mut State, touched: Vec<ObjectKey>, before: &Rejections) -> u64 {
        let accepted = state.check(touched);
        log_warnings(&accepted.warnings);
        log_rejections(before, &state.rejected);
        let current = self.current.load();
        let engine = if accepted.recompile {
            let next = &accepted.next;
            current
                .engine
                .reload(&next.config, &next.index.registry(), Instant::now())
        } else {
            current.engine.clone()
        };
        let version = current.version + 1;
        let snapshot = state.put_in_force(accepted.next, version, engine);
        self.reloads.count_rejected(snapshot.rejected.iter());
        let authorization = Arc::clone(&snapshot.authorization);
        self.current.store(Arc::new(snapshot));
        self.authorization.send_if_modified(|held| {
            let changed = !Arc::ptr_eq(held, &authorization);
            *held = authorization;
            changed
        });
        self.versions.send_replace(version);
        info!(version, "config in force");
        version
    }

    /// Counts an `apply`/`delete`: put in force, or refused whole.
    fn count<T>(&self, result: Result<T, Vec<Diagnostic>>) -> Result<T, Vec<Diagnostic>> {
        match &result {
            Ok(_) => {
                self.reloads.ok.inc();
            }
            Err(diagnostics) => {
                self.reloads.rejected.inc();
                for diagnostic in diagnostics.iter().filter(|d| d.is_error()) {
                    warn!("config refused, nothing changed: {diagnostic}");
                }
            }
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Reports `rejection`; `kept`: whether the last good version of its object stays in force.
    fn reject(&mut self, rejection: Rejection, kept: bool) {
        let id = rejection.id();
        let rejected = Rejected {
            rejection: Arc::new(rejection),
            outcome: if kept {
                Outcome::LastGoodInForce
            } else {
                Outcome::LeftOut
            },
        };
        self.rejected.insert(id, rejected);
    }

    /// Drops the rejection of `key`'s object: a valid version arrived, or it was deleted.
    fn forget_rejection(&mut self, key: &ObjectKey) {
        self.rejected
            .retain(|_, r| r.rejection.key.as_ref() != Some(key));
    }

    /// The object the sources want for `key`.
    fn wanted(&self, key: &ObjectKey) -> Option<&Arc<Sourced>> {
        match self.applied.get(key) {
            Some(applied) => Some(applied),
            None if self.deleted.contains(key) => None,
            None => self.base.get(key),
        }
    }

    /// What is in force once `touched` takes what the sources want. Changes nothing in force.
    fn check(&self, touched: Vec<ObjectKey>) -> Accepted {
        let mut next = self.in_force.clone();
        let (mut registry_changed, mut rules_changed, mut services_changed) = (false, false, false);
        let mut warnings = Vec::new();
        for key in &touched {
            let wanted = self.wanted(key);
            let current = next.objects.get(key);
            match (wanted, current) {
                (Some(wanted), Some(current)) if Arc::ptr_eq(wanted, current) => continue,
                (None, None) => continue,
                _ => {}
            }
            registry_changed |= next.index.apply(key, wanted.map(|w| &w.object));
            rules_changed |= config::is_rule_kind(&key.kind);
            services_changed |= &*key.kind == "Service";
            match wanted {
                Some(wanted) => {
                    let labels = self.gateway_labels.as_ref();
                    let found = self::warnings(wanted, labels);
                    let known = current.map(|c| self::warnings(c, labels));
                    if known.as_ref() != Some(&found) {
                        warnings.extend(found);
                    }
                    next.objects.insert(key.clone(), Arc::clone(wanted));
                }
                None => {
                    next.objects.remove(key);
                }
            }
        }
        if rules_changed {
            next.config = config::mesh_config(&next.objects);
            let policies = &next.config.authorization_policies;
            if !next.authorization.holds(policies) {
                next.authorization = Arc::new(Authorization::new(policies));
            }
            let policies = &next.config.peer_authentications;
            if !next.peer_authentication.holds(policies) {
                next.peer_authentication = Arc::new(PeerAuthentications::new(policies));
            }
        }
        if rules_changed || services_changed {
            let references = references(&next);
            warnings.extend(
                references
                    .iter()
                    .filter(|w| !self.in_force.references.contains(w))
                    .cloned(),
            );
            next.references = references.into();
        }
        Accepted {
            next,
            recompile: registry_changed || rules_changed,
            warnings,
        }
    }

    fn put_in_force(&mut self, next: InForce, version: u64, engine: Engine) -> Snapshot {
        let snapshot = Snapshot {
            version,
            engine,
            authorization: Arc::clone(&next.authorization),
            peer_authentication: Arc::clone(&next.peer_authentication),
            discovered: next.index.discovered().clone(),
            objects: next.objects.clone(),
            rejected: self.rejected.values().cloned().collect(),
            references: Arc::clone(&next.references),
        };
        self.in_force = next;
        snapshot
    }
}

/// What the VirtualServices and HTTPRoutes of `in_force` name that does not exist (subsets no
/// DestinationRule defines, hosts that are no service of the registry), and the hosts both
/// claim.
fn references(in_force: &InForce) -> Vec<Diagnostic> {
    let rules: Vec<&Sourced> = [
        "DestinationRule",
        "VirtualService",
        config::HTTP_ROUTE,
        config::GRPC_ROUTE,
    ]
    .into_iter()
    .flat_map(|kind| config::of_kind(&in_force.objects, kind))
    .map(|o| &**o)
    .collect();
    if rules.is_empty() {
        return Vec::new();
    }
    let services: BTreeSet<String> = in_force
        .index
        .registry()
        .services
        .iter()
        .map(|s| s.fqdn().to_owned())
        .collect();
    config::check_references(&rules, &[], Some(&services))
}

/// What of a folder's `contents` is in force, given what was (`before`): every valid object it
/// holds, and for an object it holds in an invalid version the version in force before (the last
/// good one; none: left out). A file that cannot be read or parsed, or has a document without
/// kind or name, cannot say which objects it holds: the objects it last held stay, unless the
/// folder now holds them elsewhere. Deleting a file, or an object from a file that parses,
/// deletes the object.
fn with_last_good(before: &ObjectSet, contents: Contents) -> (ObjectSet, Rejections) {
    let mut objects = contents.objects;
    let mut rejected = Rejections::new();
    for rejection in contents.rejected {
        let kept: Vec<Arc<Sourced>> = match &rejection.key {
            // Defined (validly) elsewhere too: that definition is in force.
            Some(key) if objects.contains_key(key) => Vec::new(),
            Some(key) => before.get(key).cloned().into_iter().collect(),
            None => before
                .values()
                .filter(|o| o.origin == rejection.origin && !objects.contains_key(&o.key))
                .cloned()
                .collect(),
        };
        let outcome = if kept.is_empty() {
            Outcome::LeftOut
        } else {
            Outcome::LastGoodInForce
        };
        for sourced in kept {
            objects.insert(sourced.key.clone(), sourced);
        }
        rejected.insert(rejection.id(), Rejected { rejection, outcome });
    }
    (objects, rejected)
}

/// Keys whose object differs between two versions of a source's set.
fn changed_keys(old: &ObjectSet, new: &ObjectSet) -> Vec<ObjectKey> {
    let mut keys: Vec<ObjectKey> = new
        .iter()
        .filter(|(key, object)| !old.get(*key).is_some_and(|o| Arc::ptr_eq(o, object)))
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(old.keys().filter(|key| !new.contains_key(*key)).cloned());
    keys
}

/// The identities named in `text`.
fn keys_of(label: &str, text: &str) -> Result<Vec<ObjectKey>, Vec<Diagnostic>> {
    let documents = config::documents(label, text).map_err(|error| vec![error])?;
    documents
        .iter()
        .map(|document| {
            let value = &document.value;
            match (value["kind"].as_str(), value["metadata"]["name"].as_str()) {
                (Some(kind), Some(name)) => Ok(ObjectKey::of(
                    value["apiVersion"].as_str().unwrap_or_default(),
                    kind,
                    value["metadata"]["namespace"].as_str(),
                    name,
                )),
                _ => Err(vec![Diagnostic::error(
                    label,
                    "",
                    "every object needs kind and metadata.name",
                )]),
            }
        })
        .collect()
}

fn log_warnings(warnings: &[Diagnostic]) {
    for warning in warnings {
        warn!("{warning}");
    }
}

/// Logs each rejection that is new, or whose diagnostics or outcome changed, since `before`:
/// once, not again on every reload or relist.
fn log_rejections(before: &Rejections, now: &Rejections) {
    for (id, rejected) in now {
        if before.get(id).is_some_and(|old| old == rejected) {
            continue;
        }
        for diagnostic in &rejected.rejection.diagnostics {
            match (diagnostic.severity, rejected.outcome) {
                (Severity::Error, Outcome::LastGoodInForce) => {
                    warn!("rejected, the last good version stays in force: {diagnostic}")
                }
                (Severity::Error, Outcome::LeftOut) => {
                    warn!("left out of the config in force: {diagnostic}")
                }
                (Severity::Warning, _) => warn!("{diagnostic}"),
            }
        }
    }
}

/// Watches the config folder and reloads within about 100 ms of a change. The returned watcher
/// must be kept alive.
pub fn watch(store: Arc<Store>) -> notify::Result<Option<notify::RecommendedWatcher>> {
    use notify::{RecursiveMode, Watcher};

    let Some(dir) = store.folder() else {
        return Ok(None);
    };
    let (changed, changes) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(Path::new(&dir), RecursiveMode::Recursive)?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            // Editors write a file in several steps: wait for a quiet moment, then reload once.
            while changes.recv().is_ok() {
                while changes.recv_timeout(Duration::from_millis(100)).is_ok() {}
                let _ = store.reload();
            }
        })
        .map_err(notify::Error::io)?;
    Ok(Some(watcher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorization::MtlsMode;
    use crate::config::Object;

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: service-c}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: service-c}
spec:
  host: service-c
  subsets:
  - {name: version-v1, labels: {version: v1}}
  - {name: version-v2, labels: {version: v2}}
";

    fn vs(weight_v1: u32, weight_v2: u32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: service-c}}
spec:
  hosts: [service-c]
  http:
  - route:
    - {{destination: {{host: service-c, subset: version-v1}}, weight: {weight_v1}}}
    - {{destination: {{host: service-c, subset: version-v2}}, weight: {weight_v2}}}
"
        )
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn open(dir: Option<&tempfile::TempDir>) -> Result<Store, Diagnostic> {
        Store::open(
            dir.map(|d| d.path().to_path_buf()),
            EngineSettings::default(),
            &mut Registry::default(),
        )
    }

    /// The weights of the VirtualService in force.
    fn weights(store: &Store) -> Option<Vec<u32>> {
        let snapshot = store.snapshot();
        let weights =
            config::of_kind(&snapshot.objects, "VirtualService").find_map(|o| match &o.object {
                Object::VirtualService(vs) => {
                    Some(vs.rule.http[0].route.iter().map(|r| r.weight).collect())
                }
                _ => None,
            });
        weights
    }

    fn kinds(store: &Store) -> Vec<String> {
        let snapshot = store.snapshot();
        snapshot
            .objects
            .keys()
            .map(|k| k.kind.to_string())
            .collect()
    }

    const POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec: {}
";

    thread_local! {
        /// Where [`logged_warnings`] collects this thread's log lines (`None`: not collecting).
        static CAPTURED: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
    }

    /// Writes into this thread's [`CAPTURED`] lines, if it collects them.
    struct Captured;

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            CAPTURED.with_borrow_mut(|lines| {
                if let Some(lines) = lines {
                    lines.extend_from_slice(buf);
                }
            });
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The `warn!` lines `f` logs on this thread.
    fn logged_warnings(f: impl FnOnce()) -> Vec<String> {
        // One subscriber for the whole test process, each thread's lines kept apart. With a
        // subscriber per test (`with_default`), tracing decides whether a log line is wanted by
        // asking the subscriber of whichever thread reaches it first, and caches the answer:
        // another test's thread, with none, made it "never" and this thread's lines were lost
        // (3 runs in about 45).
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(|| Captured)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other subscriber in the unit tests");
        });
        CAPTURED.set(Some(Vec::new()));
        f();
        let text = String::from_utf8(CAPTURED.take().unwrap_or_default()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    /// A warning is logged when its object appears (or its warnings change), not again when an
    /// edit elsewhere in its file or a relist hands over an equal copy.
    #[test]
    fn an_object_not_enforced_is_warned_about_once_as_it_appears() {
        let dir = folder(&[("policy.yml", POLICY), ("service.yml", SERVICE)]);
        let mut store = None;
        let at_start = logged_warnings(|| store = Some(open(Some(&dir)).unwrap()));
        let store = store.unwrap();
        assert_eq!(at_start.len(), 1, "{at_start:?}");
        assert!(
            at_start[0].ends_with(
                "policy.yml: RequestAuthentication shop/jwt: kind RequestAuthentication is not \
                 implemented by this mesh: not enforced"
            ),
            "{at_start:?}"
        );

        let quiet = logged_warnings(|| {
            store.reload().unwrap();
            // The file is parsed again: a new object, the same warnings.
            std::fs::write(dir.path().join("policy.yml"), format!("{POLICY}# edited\n")).unwrap();
            store.reload().unwrap();
            std::fs::write(dir.path().join("vs.yml"), vs(90, 10)).unwrap();
            store.reload().unwrap();
        });
        assert_eq!(quiet, Vec::<String>::new());
        assert_eq!(store.snapshot().version, 4);

        // Kubernetes mode: a relist reads every object again.
        let watched = open(None).unwrap();
        let relist = || {
            let objects = config::read_text("kubernetes", POLICY).unwrap();
            vec![SourceChange::Replace {
                kind: "RequestAuthentication".into(),
                objects: objects.into_iter().map(Arc::new).collect(),
                rejected: vec![],
            }]
        };
        let listed = logged_warnings(|| {
            watched.change(relist());
        });
        assert_eq!(listed.len(), 1, "{listed:?}");
        let relisted = logged_warnings(|| {
            watched.change(relist());
            watched.change(relist());
        });
        assert_eq!(relisted, Vec::<String>::new());

        let another = logged_warnings(|| {
            let second = POLICY.replace("jwt", "other-jwt");
            std::fs::write(dir.path().join("second.yml"), second).unwrap();
            store.reload().unwrap();
        });
        assert_eq!(another.len(), 1, "{another:?}");
        assert!(another[0].contains("shop/other-jwt"), "{another:?}");
    }

    #[test]
    fn ignored_lists_kinds_not_implemented_and_gateways_not_served() {
        let gateway = |name: &str, selector: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\n\
                 metadata: {{name: {name}}}\nspec:\n  selector: {selector}\n  servers:\n  \
                 - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: ['*']\n"
            )
        };
        let text = format!(
            "{POLICY}---\n{}---\n{}",
            gateway("tutorial", "{istio: ingressgateway}"),
            gateway("egress", "{istio: egressgateway}")
        );
        let labels = GatewayLabels::new([("istio".to_owned(), "egressgateway".to_owned())]);
        let with_labels = |labels| EngineSettings {
            gateway_labels: labels,
            ..EngineSettings::default()
        };
        let no_match = "does not match the labels of this agent's ingress gateway";
        let no_ingress = "this agent runs no ingress gateway (run --ingress): not served";
        for (settings, not_served, reason) in [
            (EngineSettings::default(), &["egress"][..], no_match),
            (with_labels(Some(labels)), &["tutorial"][..], no_match),
            (with_labels(None), &["egress", "tutorial"][..], no_ingress),
        ] {
            let store = Store::open(None, settings, &mut Registry::default()).unwrap();
            store.apply("objects.yml", &text).unwrap();
            let snapshot = store.snapshot();
            let ignored: Vec<(String, String)> = snapshot
                .ignored()
                .map(|(o, reason)| (o.key.to_string(), reason))
                .collect();
            let mut expected: Vec<String> = not_served
                .iter()
                .map(|n| format!("Gateway default/{n}"))
                .collect();
            expected.push("RequestAuthentication shop/jwt".to_owned());
            let keys: Vec<&str> = ignored.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, expected);
            for (_, why) in &ignored[..not_served.len()] {
                assert!(
                    why.contains(reason) && why.ends_with(": not served"),
                    "{why}"
                );
            }
        }
    }

    /// Each snapshot put in force is told (what a pod accepts depends on the policies and on
    /// its labels, so the capture looks again at each); the PeerAuthentications are rebuilt
    /// only when they changed, not when other objects do or a relist reads them again.
    #[test]
    fn versions_are_told_and_peer_authentications_rebuilt_only_when_they_change() {
        const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
";
        let list = |text: &str| {
            let objects = config::read_text("kubernetes", text).unwrap();
            vec![SourceChange::Replace {
                kind: "PeerAuthentication".into(),
                objects: objects.into_iter().map(Arc::new).collect(),
                rejected: vec![],
            }]
        };
        let shop = |store: &Store| {
            let snapshot = store.snapshot();
            snapshot
                .peer_authentication
                .for_workload("shop", &BTreeMap::new())
                .default
        };
        let store = open(None).unwrap();
        let mut versions = store.versions();
        assert!(store.snapshot().peer_authentication.is_empty());

        store.change(list(STRICT));
        assert!(versions.has_changed().unwrap());
        assert_eq!(*versions.borrow_and_update(), store.snapshot().version);
        assert_eq!(shop(&store), MtlsMode::Strict);
        let built = Arc::clone(&store.snapshot().peer_authentication);

        store.change(list(STRICT));
        store.apply("vs.yml", &vs(100, 0)).unwrap();
        assert!(versions.has_changed().unwrap());
        versions.borrow_and_update();
        assert!(
            Arc::ptr_eq(&built, &store.snapshot().peer_authentication),
            "the same policies are not rebuilt"
        );

        store.change(list(&STRICT.replace("STRICT", "DISABLE")));
        assert!(versions.has_changed().unwrap());
        assert_eq!(shop(&store), MtlsMode::Disable);

        store.change(list(""));
        assert!(store.snapshot().peer_authentication.is_empty());
        assert_eq!(shop(&store), MtlsMode::Permissive);
    }

    #[test]
    fn apply_replaces_and_delete_removes_by_identity() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let store = open(Some(&dir)).unwrap();
        assert_eq!(kinds(&store), ["DestinationRule", "Service"]);
        assert_eq!(weights(&store), None);

        let (version, keys) = store.apply("1-vs.yml", &vs(100, 0)).unwrap();
        assert_eq!(
            (version, keys[0].to_string()),
            (2, "VirtualService default/service-c".into())
        );
        assert_eq!(weights(&store), Some(vec![100, 0]));
        store.apply("2-vs.yml", &vs(90, 10)).unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));

        store.delete("2-vs.yml", &vs(90, 10)).unwrap();
        assert_eq!(weights(&store), None);
        let missing = store.delete("2-vs.yml", &vs(90, 10)).unwrap_err();
        assert_eq!(missing[0].reason, "not found");
        // A folder object can be deleted too, and re-applied.
        store.delete("dr.yml", SERVICE).unwrap();
        assert!(kinds(&store).is_empty());
        assert!(store
            .snapshot()
            .discovered
            .service_at("10.96.0.30:8080".parse().unwrap())
            .is_none());
        store.apply("dr.yml", SERVICE).unwrap();
        assert_eq!(kinds(&store), ["DestinationRule", "Service"]);
    }

    /// Where service-c's requests go in `store`'s engine: a 503 `NR` when the destination does
    /// not exist, the cluster's name otherwise.
    fn route_of(store: &Store) -> Result<String, crate::engine::EngineError> {
        let parts = http::Request::get("http://service-c:8080/")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let request = crate::engine::RequestInfo::from_parts(&parts, 8080, "default");
        let snapshot = store.snapshot();
        let plan = snapshot.engine.route(&request, Instant::now())?;
        Ok(plan.destination().cluster.to_string())
    }

    /// What is rejected, as `(key, first error)`.
    fn rejected(store: &Store) -> Vec<(Option<String>, String)> {
        store
            .snapshot()
            .rejected
            .iter()
            .map(|r| {
                let r = &r.rejection;
                let error = r.errors().next().map(|d| d.to_string()).unwrap_or_default();
                (r.key.as_ref().map(ToString::to_string), error)
            })
            .collect()
    }

    /// What of each rejected object is in force, in the order of [`rejected`].
    fn outcomes(store: &Store) -> Vec<Outcome> {
        store
            .snapshot()
            .rejected
            .iter()
            .map(|r| r.outcome)
            .collect()
    }

    /// The VirtualService `namespace/name` in force, as its weights.
    fn route_weights(store: &Store, namespace: &str, name: &str) -> Option<Vec<u32>> {
        let key = ObjectKey::new("VirtualService", Some(namespace), name);
        match &store.snapshot().objects.get(&key)?.object {
            Object::VirtualService(vs) => {
                Some(vs.rule.http[0].route.iter().map(|r| r.weight).collect())
            }
            _ => None,
        }
    }

    /// `mesh_config_rejected_objects` as served, by kind (only kinds with some).
    fn rejected_gauge(store: &Store) -> Vec<(String, i64)> {
        let mut registry = Registry::default();
        let family = store.reloads.rejected_objects.clone();
        registry.register("rejected_objects", "", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut found: Vec<(String, i64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("rejected_objects{kind=\"")?;
                let (kind, count) = rest.split_once("\"} ")?;
                let count: i64 = count.parse().ok()?;
                (count > 0).then(|| (kind.to_owned(), count))
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn an_invalid_apply_changes_nothing_and_names_file_object_field() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let store = open(Some(&dir)).unwrap();
        store.apply("good.yml", &vs(90, 10)).unwrap();
        let version = store.snapshot().version;
        let errors = store.apply("bad.yml", &vs(90, 20)).unwrap_err();
        let error = errors.iter().find(|d| d.is_error()).unwrap();
        assert_eq!(error.file, "bad.yml");
        assert_eq!(error.object, "VirtualService default/service-c");
        assert!(error.field.starts_with("spec.http[0].route"), "{error}");
        assert_eq!(store.snapshot().version, version);
        assert_eq!(weights(&store), Some(vec![90, 10]));
        assert_eq!(store.reloads.rejected.get(), 1);
        // Nothing the sources hold is left out: a refused apply is not a rejection.
        assert_eq!(rejected(&store), []);
    }

    /// A subset named before its DestinationRule arrives is not an error: the route is in
    /// force, requests to that subset are answered 503 `NR`, a warning says why, and the rule
    /// arriving puts it to work.
    #[test]
    fn a_subset_not_defined_yet_is_a_warning_and_answers_nr_until_it_is() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let store = open(Some(&dir)).unwrap();
        let unknown = vs(0, 100).replace("version-v2", "version-v3");
        let warned = logged_warnings(|| {
            store.apply("canary.yml", &unknown).unwrap();
        });
        assert_eq!(weights(&store), Some(vec![0, 100]));
        let key = ObjectKey::new("VirtualService", None, "service-c");
        let warnings = store.snapshot().warnings_of(&key);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(
            warnings[0].field,
            "spec.http[0].route[1].destination.subset"
        );
        assert_eq!(
            warnings[0].reason,
            "subset \"version-v3\" is not defined (yet): the DestinationRule for host service-c \
             defines version-v1, version-v2; requests routed to it are answered 503 NR until a \
             DestinationRule defines it"
        );
        assert_eq!(warned.len(), 1, "logged once: {warned:?}");
        assert!(
            warned[0].contains("canary.yml: VirtualService default/service-c"),
            "{warned:?}"
        );
        let error = route_of(&store).unwrap_err();
        assert_eq!(error, crate::engine::EngineError::ClusterNotFound);
        assert_eq!(
            (error.status(), error.flags().to_string()),
            (503, "NR".into())
        );

        let defined = SERVICE.replace(
            "  - {name: version-v2, labels: {version: v2}}",
            "  - {name: version-v3, labels: {version: v3}}",
        );
        store.apply("rules.yml", &defined).unwrap();
        assert_eq!(
            route_of(&store).unwrap(),
            "outbound|8080|version-v3|service-c.default.svc.cluster.local"
        );
        assert!(store.snapshot().warnings().is_empty());

        // A host that is no service yet: a warning too, and NR.
        let elsewhere = vs(100, 0)
            .replace("host: service-c, subset: version-v1", "host: service-d")
            .replace("version-v2", "version-v1");
        store.apply("elsewhere.yml", &elsewhere).unwrap();
        let warnings = store.snapshot().warnings_of(&key);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].field, "spec.http[0].route[0].destination.host");
        assert!(
            warnings[0]
                .reason
                .starts_with("host service-d is no known service (yet)"),
            "{warnings:?}"
        );
        assert_eq!(
            route_of(&store),
            Err(crate::engine::EngineError::ClusterNotFound)
        );
    }

    /// Start-up takes the valid part of a folder: a duplicate, a file that does not parse and
    /// an invalid object are left out (no good version of them was seen), each by itself,
    /// logged once, counted and listed; fixing a file puts its objects in force.
    #[test]
    fn a_bad_folder_starts_with_its_valid_part_and_its_fix_is_taken() {
        let dir = folder(&[
            ("a.yml", SERVICE),
            ("b.yml", SERVICE),
            ("c.yml", "kind: [unclosed"),
            ("vs.yml", &vs(90, 20)),
        ]);
        let mut store = None;
        let logged = logged_warnings(|| store = Some(open(Some(&dir)).unwrap()));
        let store = store.unwrap();
        assert_eq!(kinds(&store), ["DestinationRule", "Service"]);
        assert_eq!(weights(&store), None);
        let found = rejected(&store);
        let keys: Vec<Option<&str>> = found.iter().map(|(k, _)| k.as_deref()).collect();
        assert_eq!(
            keys,
            [
                Some("DestinationRule default/service-c"),
                Some("Service default/service-c"),
                None,
                Some("VirtualService default/service-c"),
            ]
        );
        assert!(
            found[0].1.ends_with(
                "defined again (first in {}): left out"
                    .replace("{}", &dir.path().join("a.yml").display().to_string())
                    .as_str()
            ),
            "{found:?}"
        );
        assert!(found[2].1.contains("c.yml: invalid YAML"), "{found:?}");
        assert_eq!(outcomes(&store), [Outcome::LeftOut; 4]);
        assert!(
            found[3].1.contains(
                "vs.yml: VirtualService default/service-c: spec.http[0].route: weights sum to 110"
            ),
            "{found:?}"
        );
        assert_eq!(logged.len(), 4, "{logged:?}");
        assert!(
            logged
                .iter()
                .all(|l| l.contains("left out of the config in force: ")),
            "{logged:?}"
        );
        assert_eq!(
            rejected_gauge(&store),
            [
                ("DestinationRule".to_owned(), 1),
                ("Service".to_owned(), 1),
                ("VirtualService".to_owned(), 1),
                ("unknown".to_owned(), 1),
            ]
        );

        // Reloads with the same problems log nothing again.
        let again = logged_warnings(|| {
            store.reload().unwrap();
        });
        assert_eq!(again, Vec::<String>::new());

        std::fs::remove_file(dir.path().join("b.yml")).unwrap();
        std::fs::write(dir.path().join("c.yml"), "").unwrap();
        std::fs::write(dir.path().join("vs.yml"), vs(90, 10)).unwrap();
        store.reload().unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));
        assert_eq!(rejected(&store), []);
        assert_eq!(rejected_gauge(&store), []);
    }

    /// A bad edit to an object in force keeps its last good version, by itself: reported (logged
    /// once, counted, listed), while every other change to the folder applies. A file that no
    /// longer parses keeps the objects it held. Deleting the object deletes it; a restart, which
    /// has seen no good version (nothing is persisted), leaves it out.
    #[test]
    fn a_bad_edit_keeps_the_last_good_version_until_deleted_and_a_restart_leaves_it_out() {
        let dir = folder(&[("service.yml", SERVICE), ("vs.yml", &vs(90, 10))]);
        let store = open(Some(&dir)).unwrap();
        assert_eq!(weights(&store), Some(vec![90, 10]));

        std::fs::write(dir.path().join("vs.yml"), vs(90, 20)).unwrap();
        let logged = logged_warnings(|| {
            store.reload().unwrap();
        });
        assert_eq!(weights(&store), Some(vec![90, 10]));
        let found = rejected(&store);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].0.as_deref(),
            Some("VirtualService default/service-c")
        );
        assert_eq!(outcomes(&store), [Outcome::LastGoodInForce]);
        assert_eq!(rejected_gauge(&store), [("VirtualService".to_owned(), 1)]);
        assert_eq!(logged.len(), 1, "{logged:?}");
        let vs_file = dir.path().join("vs.yml").display().to_string();
        assert!(
            logged[0].ends_with(&format!(
                "rejected, the last good version stays in force: {vs_file}: VirtualService \
                 default/service-c: spec.http[0].route: weights sum to 110, must be 100"
            )),
            "{logged:?}"
        );
        let again = logged_warnings(|| {
            store.reload().unwrap();
        });
        assert_eq!(again, Vec::<String>::new());

        // Everything else keeps updating: a route in another namespace comes in.
        let other = vs(100, 0).replace(
            "metadata: {name: service-c}",
            "metadata: {name: other, namespace: shop}",
        );
        std::fs::write(dir.path().join("other.yml"), &other).unwrap();
        store.reload().unwrap();
        assert_eq!(route_weights(&store, "shop", "other"), Some(vec![100, 0]));
        assert_eq!(weights(&store), Some(vec![90, 10]));

        // A file that no longer parses: the objects it held stay as they were.
        std::fs::write(dir.path().join("service.yml"), "kind: [unclosed").unwrap();
        store.reload().unwrap();
        assert_eq!(
            kinds(&store),
            [
                "DestinationRule",
                "Service",
                "VirtualService",
                "VirtualService"
            ]
        );
        assert!(route_of(&store).is_ok());
        assert_eq!(
            outcomes(&store),
            [Outcome::LastGoodInForce, Outcome::LastGoodInForce]
        );

        // A restart has seen no good version of either: left out, the rest in force.
        let restarted = open(Some(&dir)).unwrap();
        assert_eq!(kinds(&restarted), ["VirtualService"]);
        assert_eq!(
            route_weights(&restarted, "shop", "other"),
            Some(vec![100, 0])
        );
        assert_eq!(outcomes(&restarted), [Outcome::LeftOut, Outcome::LeftOut]);

        // Mended, the file's objects are taken; the bad object deleted, it is gone, last good
        // version and report with it.
        std::fs::write(dir.path().join("service.yml"), SERVICE).unwrap();
        std::fs::remove_file(dir.path().join("vs.yml")).unwrap();
        store.reload().unwrap();
        assert_eq!(route_weights(&store, "default", "service-c"), None);
        assert_eq!(
            kinds(&store),
            ["DestinationRule", "Service", "VirtualService"]
        );
        assert_eq!(rejected(&store), []);
        assert_eq!(rejected_gauge(&store), []);
    }

    /// Kubernetes mode: an invalid version of an object keeps its last good version in force,
    /// by itself, and every other change keeps coming in; a relist that still finds it invalid
    /// keeps that version (a relist once dropped it), one without it deletes it. An object this
    /// agent never saw valid is left out.
    #[test]
    fn an_invalid_watched_object_keeps_its_last_good_version_and_the_rest_keeps_updating() {
        let store = open(None).unwrap();
        let sourced = |text: &str| {
            let mut found = config::read_text("kubernetes", text).unwrap();
            found.drain(..).map(Arc::new).collect::<Vec<_>>()
        };
        let rejection = |text: &str| {
            let (_, mut rejected) = config::read_each("kubernetes", text);
            rejected.remove(0)
        };
        let upsert = |text: &str| {
            sourced(text)
                .into_iter()
                .map(SourceChange::Upsert)
                .collect()
        };
        // The route first, its subsets' rule later: both taken.
        store.change(upsert(&vs(90, 10)));
        assert_eq!(weights(&store), Some(vec![90, 10]));
        assert_eq!(
            route_of(&store).unwrap_err(),
            crate::engine::EngineError::ClusterNotFound
        );
        store.change(upsert(SERVICE));
        assert!(route_of(&store).is_ok());

        // The route made invalid: its last good version stays, reported.
        let logged = logged_warnings(|| {
            store.change(vec![SourceChange::Reject(rejection(&vs(90, 20)))]);
        });
        assert_eq!(weights(&store), Some(vec![90, 10]));
        assert_eq!(rejected(&store).len(), 1);
        assert_eq!(outcomes(&store), [Outcome::LastGoodInForce]);
        assert_eq!(rejected_gauge(&store), [("VirtualService".to_owned(), 1)]);
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert!(
            logged[0].contains(
                "rejected, the last good version stays in force: kubernetes: VirtualService \
                 default/service-c: spec.http[0].route: weights sum to 110"
            ),
            "{logged:?}"
        );
        // Everything else still comes in: a route in another namespace.
        let other = vs(100, 0).replace(
            "metadata: {name: service-c}",
            "metadata: {name: other, namespace: shop}",
        );
        store.change(upsert(&other));
        assert_eq!(route_weights(&store, "shop", "other"), Some(vec![100, 0]));

        // A relist (after `410 Gone`, say) that finds it invalid again keeps the last good
        // version, and logs nothing again ...
        let relist = |rejected: Vec<Rejection>| {
            vec![SourceChange::Replace {
                kind: "VirtualService".into(),
                objects: sourced(&other),
                rejected,
            }]
        };
        let quiet = logged_warnings(|| {
            store.change(relist(vec![rejection(&vs(90, 20))]));
        });
        assert_eq!(quiet, Vec::<String>::new());
        assert_eq!(
            route_weights(&store, "default", "service-c"),
            Some(vec![90, 10])
        );
        assert_eq!(outcomes(&store), [Outcome::LastGoodInForce]);
        assert_eq!(route_weights(&store, "shop", "other"), Some(vec![100, 0]));
        // ... one without it deletes it, and it comes back valid.
        store.change(relist(vec![]));
        assert_eq!(route_weights(&store, "default", "service-c"), None);
        assert_eq!(rejected(&store), []);
        store.change(upsert(&vs(90, 10)));
        assert_eq!(
            route_weights(&store, "default", "service-c"),
            Some(vec![90, 10])
        );
        assert_eq!(rejected(&store), []);

        // Deleted while invalid: nothing of it is left, last good version included.
        store.change(vec![SourceChange::Reject(rejection(&vs(90, 20)))]);
        let key = ObjectKey::new("VirtualService", None, "service-c");
        store.change(vec![SourceChange::Remove(key)]);
        assert_eq!(route_weights(&store, "default", "service-c"), None);
        assert_eq!(rejected(&store), []);
        assert_eq!(rejected_gauge(&store), []);

        // Invalid from the start (as after a restart: nothing is persisted): left out, on an
        // event or a list alike.
        store.change(vec![SourceChange::Reject(rejection(&vs(90, 20)))]);
        assert_eq!(route_weights(&store, "default", "service-c"), None);
        assert_eq!(outcomes(&store), [Outcome::LeftOut]);
        let restarted = open(None).unwrap();
        let logged = logged_warnings(|| {
            restarted.change(relist(vec![rejection(&vs(90, 20))]));
        });
        assert_eq!(route_weights(&restarted, "default", "service-c"), None);
        assert_eq!(outcomes(&restarted), [Outcome::LeftOut]);
        let reported: Vec<&String> = logged
            .iter()
            .filter(|l| l.contains("VirtualService default/service-c"))
            .collect();
        assert!(
            reported.len() == 1 && reported[0].contains("left out of the config in force: "),
            "{logged:?}"
        );
    }
}
