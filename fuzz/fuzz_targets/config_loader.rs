//! The config loader on any text: objects or diagnostics out, never a panic, and every
//! diagnostic names the file it is about. Text that looks like JSON is loaded as a `.json` file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let json = text.trim_start().starts_with(['{', '[']);
    let file = if json { "fuzz.json" } else { "fuzz.yaml" };
    let loaded = mesh_agent::config::load_str(file, text);
    for diagnostic in &loaded.diagnostics {
        assert!(diagnostic.to_string().starts_with(file), "{diagnostic}");
    }
});
