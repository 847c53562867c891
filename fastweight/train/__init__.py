"""Unlearning trainer (accelerate) and method wiring."""
