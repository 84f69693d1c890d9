"""Benchmarks that need more than one process or a generated corpus (`pretrain bench-prepare`)."""
