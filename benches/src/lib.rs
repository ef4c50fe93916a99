//! Benchmarks for rustfuse.
