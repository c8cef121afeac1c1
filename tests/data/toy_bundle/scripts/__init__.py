"""Toy text-conditioned segmentation net: a test stand-in for the real bundles (see ../docs/README.md)."""
