"""Immutable values of a selection of the declared settings: the base of RunConfig, EdgeSettings and
DistillContext.

Why not a dataclass per selection: a dataclass fixes its fields when its module is imported, and the
fields would be copies of the declarations (the eight places this replaces). Here a subclass says which
settings it holds (`select`), and an instance reads them when it is built, so a method registered later
(a plug-in, a test's toy method) is accepted, validated and carried by every selection at once.
Values are read as attributes in snake_case (`cfg.local_epochs`), as with the dataclasses before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

from mekd_fl.settings import methods
from mekd_fl.settings.checks import CHECKS
from mekd_fl.settings.schema import Setting

_SELECTED: dict[tuple[type, int], tuple[Setting, ...]] = {}
V = TypeVar("V", bound="SettingValues")


class SettingValues:
    """Values for the settings a subclass selects; frozen, comparable, hashable, picklable."""

    __slots__ = ("_values",)
    #: Attributes an instance holds besides its settings (DistillContext's number of classes, generator
    #: and torch device): compared and copied with them, never validated or listed as settings.
    extras: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def select(cls) -> Iterable[Setting]:
        """The settings this class holds, in table order (a subclass says which)."""
        raise NotImplementedError

    @classmethod
    def declared(cls) -> tuple[Setting, ...]:
        """`select()`, checked once per state of the method registry: a setting whose Python name is an
        attribute of the class (a method such as `keys`) would be shadowed by it, so it is refused."""
        key = (cls, methods.version())
        if key not in _SELECTED:
            found = tuple(cls.select())  # may import the built-in methods first: the version moves on
            key = (cls, methods.version())
            shadowed = [s.name for s in found if hasattr(cls, s.attr)]
            if shadowed:
                raise ValueError(f"{cls.__name__}: setting names taken by its own attributes: {', '.join(shadowed)}")
            _SELECTED[key] = found
        return _SELECTED[key]

    def __init__(self, **values: Any) -> None:
        settings = self.declared()
        known = {s.attr for s in settings}
        unknown = sorted(set(values) - known - set(self.extras))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unknown settings: {', '.join(unknown)}")
        merged = {s.attr: values.get(s.attr, s.default) for s in settings}
        merged.update({name: values[name] for name in self.extras if name in values})
        object.__setattr__(self, "_values", merged)

    # ------------------------------------------------------------------ reading
    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup fails: the settings, and extras not set by __init__.
        try:
            return object.__getattribute__(self, "_values")[name]
        except (KeyError, AttributeError):
            raise AttributeError(f"{type(self).__name__} has no setting or attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; use .replace({name}=...)")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._values))

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of the settings (not the extras), in table order."""
        return {s.name: self._values[s.attr] for s in self.declared() if s.attr in self._values}

    def replace(self: V, **changes: Any) -> V:
        """A copy with `changes` (snake_case names) applied; not validated, as `dataclasses.replace`."""
        return type(self)(**{**self._values, **changes})

    # ------------------------------------------------------------------ comparing and copying
    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values == other._values

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._values.items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), dict(self._values)))

    # ------------------------------------------------------------------ validation
    def check(self, *, skip: Iterable[Setting] = ()) -> None:
        """Refuse the first bad value with one line naming the setting and what is accepted.

        Types first (a wrong type would make the other checks meaningless), then each setting's own
        rule (choices, range, rule), then the cross-setting checks whose settings this object holds.
        `skip`: settings left unjudged (a client judging what it was sent skips the server's).
        """
        settings = [s for s in self.declared() if s.attr in self._values]
        for s in settings:
            s.check_type(self._values[s.attr])
        skipped = {s.name for s in skip}
        judged = [s for s in settings if s.name not in skipped]
        for s in judged:
            s.check_value(self._values[s.attr])
        names = {s.name for s in judged}
        for check in CHECKS:
            if names.issuperset(check.reads):
                check.rule(self)


def _rebuild(cls: type[SettingValues], values: dict[str, Any]) -> SettingValues:
    return cls(**values)
