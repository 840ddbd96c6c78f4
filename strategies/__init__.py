"""Flower strategies of mekd-fl, importable on their own: `from strategies import MEKD`."""

from strategies import protocol
from strategies.mekd import ANSWERS, EMULATOR, MEKD, QUERY, SAMPLES, RunFailed
from strategies.teacher_node import TeacherNode, TeacherNodeError

__all__ = [
    "MEKD",
    "RunFailed",
    "TeacherNode",
    "TeacherNodeError",
    "protocol",
    "EMULATOR",
    "QUERY",
    "ANSWERS",
    "SAMPLES",
]
