"""Benchmark tooling on top of the method: experiment specs, sweeps, comparisons and their reports.

`spec` parses and validates experiment specs, `sweep` runs a spec's grid (`mekd-fl bench`), `multirun`
runs several configurations in one Flower simulation, `compare` puts methods side by side
(`mekd-fl compare`), `report` draws a sweep folder's tables and plots (`mekd-fl report`) and `tables`
writes Markdown and CSV tables. Nothing in the method itself imports this package (tests/test_layout.py).
"""
