"""Fixtures shared by several test files (pytest finds them here without an import).

Plain helper functions that several files call are in `tests/helpers.py`. A test file never imports
another test file: what two files share lives in one of these two modules.
"""

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages read the run, node and task id of the current process: give them one (a test
    that builds Flower messages outside a Flower runtime uses it: `pytest.mark.usefixtures`)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
