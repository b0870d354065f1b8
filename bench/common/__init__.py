"""Helpers shared by benchmarks."""
