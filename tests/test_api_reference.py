"""README's "### API reference" covers every public name a Flower user imports, with its parameters.

Why: the API reference is what a user of the plug-in reads instead of the source, so a name or a
parameter that exists in the code and not there is one the user cannot find or cannot tell the meaning
of. The names are collected from the code at test time: `strategies.__all__` (the strategies package is
refactored in parallel, so no list of its names is kept by hand here), a module's `__all__` where it has
one, else its public classes and functions. A new public name or parameter fails here until it has an
entry. Modules are imported inside the tests, so a module broken mid-refactor fails one test with its
own error instead of the whole file's collection.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

README = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEADING = "### API reference"

#: The modules a Flower user imports from: the strategy package and the two sides' packages (read
#: through their `__all__`), the client handlers, the Flower-free client core, the oracle, the
#: teacher's own app and its answer cache.
USER_MODULES = (
    "strategies",
    "mekd_fl.client",
    "mekd_fl.teacher",
    "mekd_fl.client.handlers",
    "mekd_fl.client.edge",
    "mekd_fl.teacher.oracle",
    "mekd_fl.teacher.app",
    "mekd_fl.teacher.answer_cache",
)

#: Public by spelling, not for users: (module, name) -> why it has no entry.
INTERNAL = {
    ("mekd_fl.client.handlers", "strategy_keys"): "a helper of the project's own client app (mekd_fl/client/app.py)",
    ("mekd_fl.client.handlers", "reply"): "a helper of the project's own client app (mekd_fl/client/app.py)",
}

#: What the README has promised users by name; if collection stops finding one, it is broken, not done.
PROMISED = {
    "strategies": {"MEKD", "RunFailed", "TeacherNode", "TeacherNodeError", "protocol"},
    "mekd_fl.client": {"register_mekd", "EdgeClient", "EdgeSettings", "as_uint8_images"},
    "mekd_fl.teacher": {"TeacherOracle", "make_teacher_app", "register_teacher", "AnswerCache"},
    "mekd_fl.client.handlers": {"register_mekd", "mekd_handlers", "register_handlers"},
    "mekd_fl.client.edge": {"EdgeClient", "EdgeSettings", "as_uint8_images"},
    "mekd_fl.teacher.oracle": {"TeacherOracle", "QueryError", "BudgetExceeded"},
    "mekd_fl.teacher.app": {"register_teacher", "make_teacher_app"},
    "mekd_fl.teacher.answer_cache": {"AnswerCache"},
}


# ---------------------------------------------------------------------------- reading the README
def api_reference(text: str) -> str:
    """The text of the "### API reference" subsection: from its heading to the next heading of level <= 3."""
    lines = text.splitlines()
    try:
        start = lines.index(HEADING)
    except ValueError:
        pytest.fail(f"docs/api.md has no line {HEADING!r}")
    end = next(
        (i for i in range(start + 1, len(lines)) if re.match(r"#{1,3} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start + 1 : end])


def entries(section: str) -> list[str]:
    """The section cut into entries: each starts at a line opening with `**` (a bold heading)."""
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("**") and current:
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    blocks.append("\n".join(current))
    return blocks


def code_spans(text: str) -> list[str]:
    """Every `inline code` span of markdown text."""
    return re.findall(r"`([^`\n]+)`", text)


def mentions(text: str, name: str) -> bool:
    """Whether `name` is a whole word of some code span of `text` (`strategies/protocol.py` mentions protocol)."""
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    return any(word.search(span) for span in code_spans(text))


def entry_of(section: str, name: str) -> str | None:
    """The entries that give `name` a signature (a code span opening with `name(` or `package.name(`),
    joined; None if there is none. A name may be introduced in prose and documented in its own entry."""
    signature = re.compile(rf"^(?:[\w.]+\.)?{re.escape(name)}\(")
    found = [block for block in entries(section) if any(signature.match(span) for span in code_spans(block))]
    return "\n".join(found) if found else None


def parameters(obj: object) -> list[str]:
    """The parameter names a user passes to a public function or class (a class: its constructor)."""
    return [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]


def needs_signature(obj: object) -> bool:
    """Functions and classes are called by users; exceptions are caught and modules are read."""
    if inspect.isclass(obj):
        return not issubclass(obj, BaseException)
    return inspect.isfunction(obj)


def problems(section: str, module: str, names: dict[str, object]) -> list[str]:
    """What the API reference lacks for these names of `module`, one line each (empty: nothing)."""
    found = []
    for name, obj in sorted(names.items()):
        if not needs_signature(obj):
            if not mentions(section, name):
                found.append(f"{module}.{name}: not named in any `code span` of the API reference")
            continue
        block = entry_of(section, name)
        if block is None:
            found.append(f"{module}.{name}: no entry with its signature (a code span opening `{name}(`)")
            continue
        undocumented = [p for p in parameters(obj) if not mentions(block, p)]
        if undocumented:
            found.append(f"{module}.{name}: parameters {', '.join(undocumented)} not in its entry")
    return found


# ---------------------------------------------------------------------------- collecting the public names
def public_names(module_name: str) -> dict[str, object]:
    """`__all__` of the module when it has one, else its own public classes and functions."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return {name: getattr(module, name) for name in module.__all__}
    return {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module_name
        and (module_name, name) not in INTERNAL
    }


# ---------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("module", USER_MODULES)
def test_every_public_name_has_an_entry_with_its_parameters(module: str) -> None:
    section = api_reference(README.read_text(encoding="utf-8"))
    names = public_names(module)
    missing = PROMISED[module] - set(names)
    assert not missing, f"{module}: public names the README promised were not collected: {sorted(missing)}"
    found = problems(section, module, names)
    assert not found, "docs/api.md ### API reference is missing:\n" + "\n".join(found)


def test_strategies_names_come_from_its_all() -> None:
    strategies = importlib.import_module("strategies")
    assert set(public_names("strategies")) == set(strategies.__all__)
    assert isinstance(public_names("strategies")["protocol"], ModuleType)


def test_internal_names_still_exist() -> None:
    # an exemption for a name that is gone (or now listed in __all__) is stale: remove it
    for module_name, name in INTERNAL:
        module = importlib.import_module(module_name)
        assert hasattr(module, name), f"INTERNAL lists {module_name}.{name}, which no longer exists"
        assert name not in getattr(module, "__all__", ()), f"{module_name}.{name} is in __all__: document it"


# ---------------------------------------------------------------------------- the checker itself can fail
def _documented(a: int, *, b: str = "", **extra: object) -> None:
    """A stand-in public function."""


class _Refused(ValueError):
    """A stand-in public exception."""


SAMPLE = """intro
**`pkg._documented(a, *, b="", **extra)`**: what and why.

**`other(x)`** mentions `_Refused` and `b`.
"""


def test_checker_accepts_a_complete_entry() -> None:
    assert problems(SAMPLE, "pkg", {"_documented": _documented, "_Refused": _Refused}) == []


NO_ENTRY = "pkg._documented: no entry with its signature (a code span opening `_documented(`)"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (SAMPLE.replace("_Refused", "Refused"), "pkg._Refused: not named in any `code span` of the API reference"),
        (SAMPLE.replace("pkg._documented(", "pkg._documented ("), NO_ENTRY),  # a name, not a signature
        (SAMPLE.replace("`pkg._documented(", "pkg._documented(").replace(")`**", ")**", 1), NO_ENTRY),  # not code
        (SAMPLE.replace(', *, b=""', ""), "pkg._documented: parameters b not in its entry"),
        (SAMPLE.replace("**extra", "**more"), "pkg._documented: parameters extra not in its entry"),
    ],
)
def test_checker_reports_what_is_missing(section: str, expected: str) -> None:
    assert problems(section, "pkg", {"_documented": _documented, "_Refused": _Refused}) == [expected]


def test_a_parameter_named_only_in_another_entry_does_not_count() -> None:
    # `b` is in the second entry, not in _documented's: an entry must document its own parameters
    section = SAMPLE.replace(', *, b=""', "")
    assert mentions(section, "b")
    assert problems(section, "pkg", {"_documented": _documented}) == ["pkg._documented: parameters b not in its entry"]


def test_subsection_ends_at_the_next_heading() -> None:
    text = f"# top\n{HEADING}\n`inside`\n### Next\n`outside`\n"
    assert mentions(api_reference(text), "inside") and not mentions(api_reference(text), "outside")
