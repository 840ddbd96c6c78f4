"""The teacher side: its training and cache, the blind oracle in front of it, and its own ClientApp.

Layers inside: `app` (the teacher as a SuperNode's ClientApp) and `oracle` (validation, budgets,
hardening; plain PyTorch) -> `answer_cache` and `training` (the teacher's recipe, training and
checkpoint cache). A teacher owner imports `TeacherOracle` and `make_teacher_app` (or `register_teacher`).
"""

from mekd_fl.lazy import lazy_exports

_NAMES = {
    "TeacherOracle": "oracle",
    "QueryError": "oracle",
    "BudgetExceeded": "oracle",
    "TeacherAnswerError": "oracle",
    "AnswerCache": "answer_cache",
    "register_teacher": "app",
    "make_teacher_app": "app",
    "NodeBudgetExceeded": "app",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
