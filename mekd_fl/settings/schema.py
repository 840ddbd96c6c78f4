"""The `Setting` type: one declaration per setting, and the one-line refusals of a single value.

Why a declaration rather than a dataclass field plus copies: a setting used to be written in eight places
(RunConfig's field, its check in a 150-line `validate`, the pyproject table, the client allow-list,
EdgeSettings, DistillContext, EmulatorConfig, the docs), kept equal by tests. A `Setting` says once
what each of them needs: its kebab-case name, its type (that of its default), its default, its help text,
what it accepts (`choices`, a range in `within`, or a `rule` for the rest) and who receives it
(`audience`); the rest is derived (see `mekd_fl.settings`).

Nothing here imports torch or Flower: the CLI refuses a bad setting in well under a second.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mekd_fl.errors import ConfigError

#: Who reads a setting. "server": the server alone (never sent to a client: teacher, budgets, paths,
#: aggregation); "client": the clients alone; "both": the server and the clients. Whatever is not
#: "server" is sent to every client (`RunConfig.client_dict`).
Audience = Literal["server", "client", "both"]
AUDIENCES: tuple[str, ...] = ("server", "client", "both")
Value = bool | int | float | str
Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]

_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_NUMBER = r"-?[0-9][0-9.e+-]*"
_BOUND = re.compile(rf"(>=|>) ({_NUMBER})")
_INTERVAL = re.compile(rf"([\[(])({_NUMBER}), ({_NUMBER})([\])])")


@dataclass(frozen=True)
class Range:
    """Bounds parsed from a `within` text such as "> 0", ">= 1", "(0, 1]" or "[0, 0.5)"."""

    low: float | None
    low_closed: bool
    high: float | None = None
    high_closed: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        if bound := _BOUND.fullmatch(text):
            return cls(_number(bound.group(2)), bound.group(1) == ">=")
        if interval := _INTERVAL.fullmatch(text):
            opening, low, high, closing = interval.groups()
            return cls(_number(low), opening == "[", _number(high), closing == "]")
        raise ValueError(f"within={text!r}: write '> a', '>= a' or an interval such as '(0, 1]'")

    def holds(self, value: float) -> bool:
        if self.low is not None and not (value >= self.low if self.low_closed else value > self.low):
            return False
        return self.high is None or (value <= self.high if self.high_closed else value < self.high)


def _number(text: str) -> float:
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else float(text)


@dataclass(frozen=True)
class Setting:
    """One setting of a run, declared once.

    name: kebab-case, as in Flower's run config and YAML (snake_case in Python: `attr`).
    default: its type is the setting's type (bool, int, float or str; write 1.0 for a float).
    help: one or more sentences for the docs' table and `--help`-style listings.
    audience: who reads it (see `Audience`); everything but "server" is sent to the clients.
    choices: the accepted strings, or a function returning them when they are known only at run time
        (the registered distillation methods).
    within: the accepted numbers, written as the refusal will say them: "> 0", ">= 1", "(0, 1]", "[0, 0.5)".
    note: words appended to a range refusal, e.g. "(-1: off)".
    rule: a check of the value alone that choices and ranges cannot say (a name pattern); it raises a
        one-line ConfigError naming the setting.
    distill: the distillation methods read it (it is a field of DistillContext); a method's own settings
        are declared in its file and are always in DistillContext.
    edge: EdgeSettings carries it (a client setting). False for what only the project's own Flower client
        reads to build its data and model (an EdgeClient is given the user's images and model instead).
    """

    name: str
    default: Value
    help: str
    audience: Audience
    choices: Choices | None = None
    within: str = ""
    note: str = ""
    rule: Callable[[Setting, Any], None] | None = None
    distill: bool = False
    edge: bool = True

    def __post_init__(self) -> None:
        """Refuse a malformed declaration when the module declaring it is imported, not when a run starts."""
        where = f"Setting {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"{where}: the name must be kebab-case (lower-case words joined by '-')")
        if type(self.default) not in (bool, int, float, str):
            raise TypeError(f"{where}: the default must be a bool, int, float or str")
        if self.audience not in AUDIENCES:
            raise ValueError(f"{where}: audience must be one of {', '.join(AUDIENCES)}")
        if self.within and (self.type not in (int, float) or not Range.parse(self.within).holds(self.default)):
            raise ValueError(f"{where}: within={self.within!r} needs a number setting whose default it accepts")
        if self.choices is not None and self.type is not str:
            raise ValueError(f"{where}: choices need a str setting")

    # ------------------------------------------------------------------ derived names
    @property
    def attr(self) -> str:
        """The Python name: `cfg.attr` on RunConfig, EdgeSettings and DistillContext."""
        return self.name.replace("-", "_")

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def sent(self) -> bool:
        """Whether a client receives it (in `RunConfig.client_dict`)."""
        return self.audience != "server"

    def accepted(self) -> tuple[str, ...] | None:
        """The accepted strings, asked of the function when they are known only at run time."""
        return self.choices() if callable(self.choices) else self.choices

    # ------------------------------------------------------------------ values
    def coerce(self, value: Any, key: str | None = None) -> Value:
        """Turn a CLI/TOML/YAML value into the setting's type, with a one-line error naming `key` (as the
        user spelled it; default: the kebab-case name) when impossible."""
        key = key or self.name
        target = self.type
        if target in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a valid {target.__name__}; accepted: a number, not true/false")
        if target in (int, float) and not _finite_or_not_number(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        if isinstance(value, target):
            return value
        try:
            if target is bool:
                if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                    return value.lower() in ("true", "1", "yes")
                if isinstance(value, (int, float)) and value in (0, 1):
                    return bool(value)
                raise ValueError
            if target is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            if target is float:
                return float(value)
            return str(value)
        except (TypeError, ValueError, OverflowError):
            pass
        raise ConfigError(f"{key}={value!r} is not a valid {target.__name__}")

    def check_type(self, value: Any) -> None:
        """Refuse a value of the wrong type, also in an object built directly rather than from a mapping."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}={value!r} is not a valid bool; accepted: true, false")
        elif self.type in (int, float):
            integer = self.type is int
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                kind = "an integer" if integer else "a number"
                raise ConfigError(
                    f"{self.name}={value!r} is not a valid {self.type.__name__}; accepted: {kind}, not true/false"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{self.name}={value!r} must be a finite number")
        elif not isinstance(value, str):
            raise ConfigError(f"{self.name}={value!r} is not a valid str")

    def check_value(self, value: Any) -> None:
        """Refuse a value of the right type that the setting does not accept (choices, range, rule)."""
        accepted = self.accepted()
        if accepted is not None and value not in accepted:
            raise ConfigError(f"{self.name}={value!r} is not accepted; accepted: {', '.join(accepted)}")
        if self.within and not Range.parse(self.within).holds(value):
            where = self.within if self.within[0] == ">" else f"in {self.within}"
            integer = "an integer " if self.type is int else ""
            note = f" {self.note}" if self.note else ""
            raise ConfigError(f"{self.name}={value} must be {integer}{where}{note}")
        if self.rule is not None:
            self.rule(self, value)

    # ------------------------------------------------------------------ documentation
    def meaning(self) -> str:
        """The table's "meaning" cell: the help text and, for a choice, what is accepted."""
        accepted = self.accepted()
        return self.help + (f" One of: {', '.join(accepted)}." if accepted else "")

    def toml_default(self) -> str:
        """The default as a TOML value (pyproject's `[tool.flwr.app.config]`)."""
        if self.type is bool:
            return "true" if self.default else "false"
        if self.type is str:
            return json.dumps(self.default)
        return repr(self.default)


def _finite_or_not_number(value: Any) -> bool:
    """False only for a value that reads as an infinite or NaN number (float, or a string like 'inf')."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return True  # not a number at all: the type conversion reports it
    return math.isfinite(number)
