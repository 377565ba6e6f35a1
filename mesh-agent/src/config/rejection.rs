//! What a source holds that cannot be put in force: an object that failed validation, or a
//! whole file that could not be read or parsed. Each is rejected by itself — the rest of the
//! source applies — and reported with every diagnostic found; the store decides what of it
//! stays in force (the last good version it saw, if any).

use std::sync::Arc;

use super::{
    diagnostic::Diagnostic,
    document::{documents, Document},
    object::{read, ObjectKey, Sourced},
};

/// One object (or file) that cannot be put in force, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from: a file, or `kubernetes`.
    pub origin: Arc<str>,
    /// Its identity, when it has one (kind and name were readable): no version of it from this
    /// source but the last good one can be in force while it is rejected. `None` for a file
    /// that could not be read or parsed, or a document without kind or name.
    pub key: Option<ObjectKey>,
    /// Every problem found: at least one error, and the warnings found with them.
    pub diagnostics: Vec<Diagnostic>,
}

/// What a rejection counts as in `mesh_config_rejected_objects{kind}`: the kinds the mesh reads,
/// `other` for any other kind, `unknown` when none could be read; a fixed set, whatever a file
/// says.
pub const COUNTED_KINDS: [&str; 10] = [
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "Service",
    "EndpointSlice",
    "Pod",
    super::gateway_api::HTTP_ROUTE,
    super::gateway_api::GRPC_ROUTE,
    "other",
    "unknown",
];

impl Rejection {
    /// What it is, for counting: one of the kinds the mesh reads, `other`, or `unknown`.
    pub fn counted_kind(&self) -> &'static str {
        match &self.key {
            None => "unknown",
            Some(key) => COUNTED_KINDS[..8]
                .iter()
                .find(|kind| **kind == &*key.kind)
                .copied()
                .unwrap_or("other"),
        }
    }

    /// Tells rejections of one source apart: the object's identity, or for one without, where
    /// it is (the file, or `Kind (document N)`).
    pub fn id(&self) -> (Arc<str>, String) {
        let label = match &self.key {
            Some(key) => key.to_string(),
            None => self
                .diagnostics
                .first()
                .map(|d| d.object.clone())
                .unwrap_or_default(),
        };
        (Arc::clone(&self.origin), label)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
}

/// Every object of `text` that is valid, and every one that is not, each by itself. A text that
/// does not parse is one rejection with no identity: none of its objects can be known.
pub fn read_each(file: &str, text: &str) -> (Vec<Sourced>, Vec<Rejection>) {
    let origin: Arc<str> = file.into();
    let documents = match documents(file, text) {
        Ok(documents) => documents,
        Err(error) => {
            let rejection = Rejection {
                origin,
                key: None,
                diagnostics: vec![error],
            };
            return (Vec::new(), vec![rejection]);
        }
    };
    let mut objects = Vec::new();
    let mut rejected = Vec::new();
    for document in documents {
        let key = key_of(&document);
        match read(file, document) {
            Ok(sourced) => objects.push(sourced),
            Err(diagnostics) => rejected.push(Rejection {
                origin: Arc::clone(&origin),
                key,
                diagnostics,
            }),
        }
    }
    (objects, rejected)
}

/// A document's identity as written, read before it is validated (so a rejected object is
/// still known by name).
fn key_of(document: &Document) -> Option<ObjectKey> {
    let value = &document.value;
    let kind = value["kind"].as_str().filter(|k| !k.is_empty())?;
    let name = value["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())?;
    Some(ObjectKey::of(
        value["apiVersion"].as_str().unwrap_or_default(),
        kind,
        value["metadata"]["namespace"].as_str(),
        name,
    ))
}
