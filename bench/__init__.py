"""Benchmarks: this project against the Keras example and perceiver-pytorch; see docs/benchmarks.md."""
