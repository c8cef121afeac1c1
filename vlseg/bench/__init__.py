"""Shared code of the ``scripts/benchmark_*.py`` family (issue 7): data, bundle loading, timing, metrics, reports.

Nothing here is imported by the bundles or the app; it only measures them.
"""
