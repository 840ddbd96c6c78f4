"""Benchmark tooling on top of the method: experiment specs, sweeps, comparisons and their reports.

`spec` parses and validates experiment specs, `sweep` runs a spec's grid (`mekd-fl bench`), `multirun`
runs several configurations in one Flower simulation, `compare` puts methods side by side
(`mekd-fl compare`), `report` writes a sweep folder's table, figures and provenance (`mekd-fl report`)
from `cells` (the folder read back) and `figures` (which numbers each figure shows; mekd_fl.plots draws
them), and `tables` writes Markdown and CSV tables. Only mekd_fl.cli imports this package (an import-linter
contract in pyproject.toml).
"""
