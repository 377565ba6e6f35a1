//! The HTTP/1 head checker on any byte stream, cut into reads of any size: never a panic, and
//! the same verdicts however the stream is cut (a client chooses its writes; the answer must
//! not depend on them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::http::head_check::{Checked, HeadChecker};

fn verdicts<'a>(reads: impl Iterator<Item = &'a [u8]>) -> Vec<Checked> {
    let mut checker = HeadChecker::new();
    let mut verdicts = Vec::new();
    for read in reads {
        checker.feed(read, &mut |checked| verdicts.push(checked));
    }
    checker.end(&mut |checked| verdicts.push(checked));
    verdicts
}

fuzz_target!(|input: &[u8]| {
    let Some((&read_size, stream)) = input.split_first() else {
        return;
    };
    let whole = verdicts(std::iter::once(stream));
    let cut = verdicts(stream.chunks(usize::from(read_size).max(1)));
    assert_eq!(whole, cut);
});
