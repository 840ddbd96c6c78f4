"""Flower strategies of mekd-fl, importable on their own: `from strategies import MEKD`.

The strategy classes are imported on first use (PEP 562), so that `import strategies.protocol` (what a
client or a foreign Flower app needs to speak MEKD's protocol) loads neither torch nor `flwr.serverapp`.
"""

from __future__ import annotations

import importlib
from typing import Any

from strategies import protocol

#: Public name -> the module that defines it.
_LAZY = {
    "MEKD": "strategies.mekd",
    "RunFailed": "strategies.failures",
    "TeacherNode": "strategies.teacher_node",
    "TeacherNodeError": "strategies.teacher_node",
}

__all__ = ["MEKD", "RunFailed", "TeacherNode", "TeacherNodeError", "protocol"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
