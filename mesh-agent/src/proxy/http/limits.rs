//! Sizes the downstream side enforces, shared by the hyper glue, the smuggling guard and the
//! try loop. The settable bounds (timeouts, budgets) are `proxy::Limits`.

/// Largest request head accepted; larger gets 431 (Envoy's default is 60 KiB too). For
/// HTTP/2 it is also the largest header list, which bounds a CONTINUATION flood.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Bodies up to this size are buffered so the request can be retried and mirrored.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Streams one HTTP/2 client connection may have open at once: Envoy's edge recommendation
/// (its default, 2^31 - 1, is unbounded).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// HTTP/2 flow-control windows: what a client may send before the agent reads it, per stream
/// and per connection (Envoy's edge recommendation: 64 KiB and 1 MiB; hyper's default, 1 MiB
/// per stream, let 10 connections × 200 streams grow the agent by 150 MiB).
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Response bytes queued per HTTP/2 stream for a client that reads slowly.
pub const H2_MAX_SEND_BUFFER: usize = 64 * 1024;

/// Streams a client may open and reset before the agent has accepted them (a rapid-reset
/// flood) before the connection gets GOAWAY: h2's and hyper's default, set here so it stays.
pub const H2_MAX_PENDING_RESET_STREAMS: usize = 20;
