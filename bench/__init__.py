"""Benchmarks: programs that report numbers (``textgen bench ...``), never timed tests."""
