"""Naive full-softmax references written from the spec (float64-capable, autograd only), for tests and benchmarks."""
