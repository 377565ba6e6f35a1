//! Protocol detection on any first bytes: never a panic, and a decision once made stands
//! whatever the client sends next (the proxy acts on the first decision it sees).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::detect::classify;

fuzz_target!(|bytes: &[u8]| {
    let mut decided = None;
    for end in 0..=bytes.len() {
        match (decided, classify(&bytes[..end])) {
            (None, now) => decided = now,
            (Some(before), now) => assert_eq!(now, Some(before), "{:?}", &bytes[..end]),
        }
    }
});
