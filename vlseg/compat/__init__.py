"""Compatibility helpers for the CPU-only environment (see README, "torchvision on CPU")."""
