//! Local mode's source: a folder of Kubernetes-shaped YAML/JSON (`Service`, `EndpointSlice`,
//! `Pod`, `VirtualService`, `DestinationRule`, `Gateway`, ...), read recursively in sorted
//! order. The folder is never written. A file whose text has not changed since the last read is
//! not parsed again: its objects are the very same, so the store sees no change in them.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::config::{self, Diagnostic, ObjectSet, Rejection, Sourced};

pub struct Folder {
    dir: PathBuf,
    /// Per file: a digest of the text last read and what it gave.
    cache: HashMap<PathBuf, (u64, Arc<Parsed>)>,
}

/// A file's valid objects and what in it was rejected.
#[derive(Default)]
struct Parsed {
    objects: Vec<Arc<Sourced>>,
    rejected: Vec<Arc<Rejection>>,
}

/// What the folder holds: every valid object, and every object (or file) rejected (the store
/// keeps the last good version of what it held, if any).
#[derive(Default)]
pub struct Contents {
    pub objects: ObjectSet,
    pub rejected: Vec<Arc<Rejection>>,
}

impl Folder {
    pub fn new(dir: PathBuf) -> Folder {
        Folder {
            dir,
            cache: HashMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every valid object of the folder, and what is rejected, each by itself: an object that
    /// fails validation, a file that cannot be read or parsed (all of its objects), an object
    /// defined again in a later file (the first definition, in sorted order, stays). `Err` only
    /// when the folder itself cannot be listed.
    pub fn read(&mut self) -> Result<Contents, Diagnostic> {
        let mut files = Vec::new();
        config::config_files(&self.dir, &mut files).map_err(|e| {
            Diagnostic::error(
                &self.dir.display().to_string(),
                "",
                format!("cannot read the config folder: {e}"),
            )
        })?;
        self.cache.retain(|path, _| files.contains(path));
        let mut contents = Contents::default();
        for file in files {
            let label = file.display().to_string();
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    self.cache.remove(&file);
                    contents.rejected.push(Arc::new(Rejection {
                        origin: label.as_str().into(),
                        key: None,
                        diagnostics: vec![Diagnostic::error(
                            &label,
                            "",
                            format!("cannot read: {e}"),
                        )],
                    }));
                    continue;
                }
            };
            let digest = digest(&text);
            if self
                .cache
                .get(&file)
                .is_none_or(|(cached, _)| *cached != digest)
            {
                self.cache
                    .insert(file.clone(), (digest, Arc::new(parse(&label, &text))));
            }
            let parsed = &self.cache[&file].1;
            contents.rejected.extend(parsed.rejected.iter().cloned());
            for sourced in &parsed.objects {
                if let Some(first) = contents.objects.get(&sourced.key) {
                    // Usually a copy-paste slip; keeping the first in sorted order makes the
                    // choice the same on every read, whatever order files were written in.
                    let reason = format!("defined again (first in {}): left out", first.origin);
                    contents.rejected.push(Arc::new(Rejection {
                        origin: Arc::clone(&sourced.origin),
                        key: Some(sourced.key.clone()),
                        diagnostics: vec![Diagnostic::error(
                            &label,
                            &sourced.key.to_string(),
                            reason,
                        )],
                    }));
                    continue;
                }
                contents
                    .objects
                    .insert(sourced.key.clone(), Arc::clone(sourced));
            }
        }
        Ok(contents)
    }
}

/// A file's objects, each valid one by itself.
fn parse(label: &str, text: &str) -> Parsed {
    let (objects, rejected) = config::read_each(label, text);
    Parsed {
        objects: objects.into_iter().map(Arc::new).collect(),
        rejected: rejected.into_iter().map(Arc::new).collect(),
    }
}

fn digest(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: service-c}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 8080}]}
";

    const ROUTE: &str = "
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: service-c}
spec:
  hosts: [service-c]
  http:
  - route:
    - destination: {host: service-c}
";

    fn keys(contents: &Contents) -> Vec<String> {
        contents.objects.keys().map(ToString::to_string).collect()
    }

    fn rejected(contents: &Contents) -> Vec<(Option<String>, String)> {
        contents
            .rejected
            .iter()
            .map(|r| {
                let reason = r.errors().next().map(|d| d.to_string()).unwrap_or_default();
                (r.key.as_ref().map(ToString::to_string), reason)
            })
            .collect()
    }

    #[test]
    fn an_unchanged_file_gives_the_same_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yml"), SERVICE).unwrap();
        let mut folder = Folder::new(dir.path().to_path_buf());
        let first = folder.read().unwrap();
        let again = folder.read().unwrap();
        let (a, b) = (
            first.objects.values().next().unwrap(),
            again.objects.values().next().unwrap(),
        );
        assert!(Arc::ptr_eq(a, b), "an unchanged file is not parsed again");
    }

    /// A duplicate, a file that does not parse and an invalid object are each rejected by
    /// themselves; the rest of the folder (the other objects of the same file included) stays.
    #[test]
    fn what_is_invalid_is_rejected_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("a.yml", SERVICE);
        write("b.yml", SERVICE);
        write("c.yml", "kind: [unclosed");
        let invalid = ROUTE
            .replace("name: service-c}", "name: broken}")
            .replace("- route:", "- timeout: soon\n    route:");
        write("d.yml", &format!("{ROUTE}---\n{invalid}"));
        let mut folder = Folder::new(dir.path().to_path_buf());
        let contents = folder.read().unwrap();
        assert_eq!(
            keys(&contents),
            [
                "Service default/service-c",
                "VirtualService default/service-c"
            ]
        );
        let found = rejected(&contents);
        assert_eq!(found.len(), 3, "{found:?}");
        let b = dir.path().join("b.yml").display().to_string();
        let a = dir.path().join("a.yml").display().to_string();
        assert_eq!(
            found[0],
            (
                Some("Service default/service-c".to_owned()),
                format!("{b}: Service default/service-c: defined again (first in {a}): left out")
            )
        );
        assert_eq!(found[1].0, None);
        assert!(found[1].1.contains("c.yml: invalid YAML"), "{found:?}");
        assert_eq!(found[2].0.as_deref(), Some("VirtualService default/broken"));
        assert!(
            found[2].1.contains(
                "d.yml: VirtualService default/broken: spec.http[0].timeout: invalid duration \"soon\""
            ),
            "{found:?}"
        );

        // A folder that cannot be listed is the only failure.
        let error = Folder::new(dir.path().join("missing"))
            .read()
            .err()
            .unwrap();
        assert!(
            error.reason.starts_with("cannot read the config folder"),
            "{error}"
        );
    }
}
