//! Benchmarks live in `benches/` (criterion) and in the peer comparison harness binary.
