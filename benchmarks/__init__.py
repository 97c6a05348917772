"""The zorro benchmark suite: ``pytest benchmarks/ --benchmark-only`` (see docs/benchmarks.md)."""
