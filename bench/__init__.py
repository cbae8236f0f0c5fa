"""Benchmark tooling: spawns servers and load generators against a model repository. Not part of the
service; like it, it never imports torch."""
