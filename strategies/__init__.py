"""Flower strategies of mekd-fl, importable on their own: `from strategies import MEKD`."""

from strategies import protocol
from strategies.mekd import ANSWERS, EMULATOR, MEKD, QUERY, SAMPLES, RunFailed

__all__ = ["MEKD", "RunFailed", "protocol", "EMULATOR", "QUERY", "ANSWERS", "SAMPLES"]
