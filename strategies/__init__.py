"""Flower strategies of mekd-fl, importable on their own: `from strategies import MEKD`."""

from strategies.mekd import ANSWERS, EMULATOR, QUERY, SAMPLES, MEKD

__all__ = ["MEKD", "EMULATOR", "QUERY", "ANSWERS", "SAMPLES"]
