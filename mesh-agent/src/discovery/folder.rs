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

use crate::config::{self, Diagnostic, ObjectSet, Sourced};

pub struct Folder {
    dir: PathBuf,
    /// Per file: a digest of the text last read and what it gave.
    cache: HashMap<PathBuf, (u64, Parsed)>,
}

/// A file's objects, or every problem with it.
type Parsed = Result<Vec<Arc<Sourced>>, Vec<Diagnostic>>;

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

    /// Every object of the folder, or every problem found (a file that cannot be read or
    /// parsed, an invalid object, an object defined in two files).
    pub fn read(&mut self) -> Result<ObjectSet, Vec<Diagnostic>> {
        let mut files = Vec::new();
        config::config_files(&self.dir, &mut files).map_err(|e| {
            vec![Diagnostic::error(
                &self.dir.display().to_string(),
                "",
                format!("cannot read the config folder: {e}"),
            )]
        })?;
        self.cache.retain(|path, _| files.contains(path));
        let mut objects = ObjectSet::new();
        let mut errors = Vec::new();
        for file in files {
            let label = file.display().to_string();
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(Diagnostic::error(&label, "", format!("cannot read: {e}")));
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
                    .insert(file.clone(), (digest, parse(&label, &text)));
            }
            match &self.cache[&file].1 {
                Ok(found) => {
                    for sourced in found {
                        if let Some(first) = objects.get(&sourced.key) {
                            errors.push(Diagnostic::error(
                                &label,
                                &sourced.key.to_string(),
                                format!("defined again (first in {})", first.origin),
                            ));
                            continue;
                        }
                        objects.insert(sourced.key.clone(), Arc::clone(sourced));
                    }
                }
                Err(diagnostics) => errors.extend(diagnostics.iter().cloned()),
            }
        }
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(errors)
        }
    }
}

/// Every object of one file, or every problem with it.
fn parse(label: &str, text: &str) -> Parsed {
    config::read_text(label, text).map(|objects| objects.into_iter().map(Arc::new).collect())
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

    #[test]
    fn an_unchanged_file_gives_the_same_objects_and_a_duplicate_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yml"), SERVICE).unwrap();
        let mut folder = Folder::new(dir.path().to_path_buf());
        let first = folder.read().unwrap();
        let again = folder.read().unwrap();
        let (a, b) = (
            first.values().next().unwrap(),
            again.values().next().unwrap(),
        );
        assert!(Arc::ptr_eq(a, b), "an unchanged file is not parsed again");

        std::fs::write(dir.path().join("b.yml"), SERVICE).unwrap();
        let errors = folder.read().unwrap_err();
        assert!(
            errors.iter().any(|d| d.reason.contains("defined again")),
            "{errors:?}"
        );
        std::fs::write(dir.path().join("b.yml"), "kind: [unclosed").unwrap();
        let errors = folder.read().unwrap_err();
        assert!(errors[0].file.ends_with("b.yml"), "{errors:?}");
    }
}
