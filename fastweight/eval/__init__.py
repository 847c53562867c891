"""Evaluation metrics and benchmark evaluators."""
