//! Text in, documents out: the one place where YAML and JSON are parsed. Everything after works
//! on the parsed values and never sees the text again.

use serde::Deserialize;
use serde_json::Value;

use super::diagnostic::Diagnostic;

/// One object as written: a document of a file, or an item of a `kind: List`.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Where it is in its file, for diagnostics about objects that have no name yet
    /// (`document 2`, `document 1 items[3]`).
    pub location: String,
    pub value: Value,
}

/// Splits `text` into its objects: every document of a YAML stream (or, for a `.json` label, of a
/// stream of JSON values), with `kind: List` expanded and empty documents skipped. A syntax error
/// fails the whole text, since the parser cannot resynchronise after it.
pub fn documents(file: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let mut documents = Vec::new();
    let mut add = |index: usize, value: Value| {
        expand(&mut documents, format!("document {}", index + 1), value)
    };
    if file.ends_with(".json") {
        for (index, value) in serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .enumerate()
        {
            let value =
                value.map_err(|e| Diagnostic::error(file, "", format!("invalid JSON: {e}")))?;
            add(index, value);
        }
    } else {
        for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document)
                .map_err(|e| Diagnostic::error(file, "", format!("invalid YAML: {e}")))?;
            add(index, value);
        }
    }
    Ok(documents)
}

/// A `kind: List` stands for its items; anything else for itself.
fn expand(documents: &mut Vec<Document>, location: String, mut value: Value) {
    if value.is_null() {
        return; // an empty document, e.g. after a trailing `---`
    }
    if value["kind"] == "List" {
        if let Some(Value::Array(items)) = value.get_mut("items").map(Value::take) {
            for (index, item) in items.into_iter().enumerate() {
                expand(documents, format!("{location} items[{index}]"), item);
            }
            return;
        }
    }
    documents.push(Document { location, value });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_expand_and_empty_documents_vanish() {
        let text =
            "kind: List\nitems:\n- {kind: Pod}\n- {kind: Service}\n---\n---\nkind: Gateway\n";
        let found = documents("a.yml", text).unwrap();
        let locations: Vec<_> = found.iter().map(|d| d.location.as_str()).collect();
        assert_eq!(
            locations,
            ["document 1 items[0]", "document 1 items[1]", "document 3"]
        );
        assert_eq!(found[1].value["kind"], "Service");
    }

    #[test]
    fn a_syntax_error_names_the_file_and_the_line() {
        let error = documents("bad.yml", "a: 1\nkind: [unclosed\n").unwrap_err();
        assert_eq!(error.file, "bad.yml");
        assert!(error.reason.starts_with("invalid YAML"), "{error}");
        assert!(error.reason.contains("line"), "{error}");
        let error = documents("bad.json", "{\"kind\": ").unwrap_err();
        assert!(error.reason.starts_with("invalid JSON"), "{error}");
    }
}
