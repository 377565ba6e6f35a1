//! What the loader reports: errors (the config must not be used) and warnings (accepted, but
//! something the user wrote has no effect). Each names file, object, field path and reason.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One finding. Displays as `file: Kind namespace/name: field.path: reason`; the object and
/// field parts are left out when empty (e.g. a YAML syntax error belongs to no object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file label given to the loader (a path as written, or any label for `load_str`).
    pub file: String,
    /// `Kind namespace/name`, or `document N` when the object has no usable kind or name.
    pub object: String,
    /// Path from the object's root, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub reason: String,
}

impl Diagnostic {
    /// An error about a whole file (`object` empty) or one object, no particular field.
    pub fn error(file: &str, object: &str, reason: impl fmt::Display) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: file.to_owned(),
            object: object.to_owned(),
            field: String::new(),
            reason: reason.to_string(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file)?;
        if !self.object.is_empty() {
            write!(f, " {}:", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, " {}:", self.field)?;
        }
        write!(f, " {}", self.reason)
    }
}

/// Collects diagnostics for one object, so conversion code only names the field and reason.
pub(super) struct ObjectContext<'a> {
    file: &'a str,
    object: &'a str,
    diagnostics: &'a mut Vec<Diagnostic>,
    errors: usize,
}

pub(super) const UNSUPPORTED: &str = "not supported by this mesh, ignored";

impl<'a> ObjectContext<'a> {
    pub fn new(file: &'a str, object: &'a str, diagnostics: &'a mut Vec<Diagnostic>) -> Self {
        ObjectContext {
            file,
            object,
            diagnostics,
            errors: 0,
        }
    }

    /// Conversion fills placeholders for invalid values so it can go on and report every
    /// error; the object may be used only when this is false.
    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }

    pub fn error(&mut self, field: &str, reason: impl fmt::Display) {
        self.push(Severity::Error, field, reason);
    }

    pub fn warn(&mut self, field: &str, reason: impl fmt::Display) {
        self.push(Severity::Warning, field, reason);
    }

    /// Warns when an Istio field we do not implement is present.
    pub fn unsupported<T>(&mut self, field: &str, value: &Option<T>) {
        if value.is_some() {
            self.warn(field, UNSUPPORTED);
        }
    }

    /// Records the error of a fallible conversion and turns it into an `Option`.
    pub fn check<T, E: fmt::Display>(&mut self, field: &str, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.error(field, e)).ok()
    }

    fn push(&mut self, severity: Severity, field: &str, reason: impl fmt::Display) {
        if severity == Severity::Error {
            self.errors += 1;
        }
        self.diagnostics.push(Diagnostic {
            severity,
            file: self.file.to_owned(),
            object: self.object.to_owned(),
            field: field.to_owned(),
            reason: reason.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_leaves_out_empty_parts() {
        let mut d = Diagnostic {
            severity: Severity::Error,
            file: "deploy/examples/x.yml".into(),
            object: "VirtualService default/service-c".into(),
            field: "spec.http[0].route".into(),
            reason: "weights sum to 90, must be 100".into(),
        };
        assert_eq!(
            d.to_string(),
            "deploy/examples/x.yml: VirtualService default/service-c: spec.http[0].route: \
             weights sum to 90, must be 100"
        );
        d.object.clear();
        d.field.clear();
        assert_eq!(
            d.to_string(),
            "deploy/examples/x.yml: weights sum to 90, must be 100"
        );
    }
}
