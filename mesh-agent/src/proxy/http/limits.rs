//! Sizes the downstream side enforces, shared by the hyper glue, the smuggling guard and the
//! try loop.

/// Largest request head accepted; larger gets 431 (Envoy's default is 60 KiB too).
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Bodies up to this size are buffered so the request can be retried and mirrored.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;
