//! The L7 engine: pure per-request decisions (route, split, balance, retry, outlier, pool,
//! fault, mirror). No sockets, no kernel, no I/O: clock and randomness are injected.
