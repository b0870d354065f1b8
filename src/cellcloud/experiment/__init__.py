"""Experiments that run a real region on this machine and measure it."""
