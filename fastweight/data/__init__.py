"""Benchmark data loading and formatting (TOFU, MUSE, WMDP)."""
