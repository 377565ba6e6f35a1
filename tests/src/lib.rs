//! Simulated node harness.
