"""The distillation methods' names and the settings each declares in its own file, without torch.

Why here and not only in `mekd_fl.distill.base`: a method declares its hyperparameters beside its loss
(`settings = (Setting("dkd-alpha", ...), ...)` on the class in `mekd_fl/distill/dkd.py`), and
`@register("dkd")` records them here. The settings schema reads them from this module, which imports
neither torch nor the methods, so the `method` setting can name its accepted values and no import cycle
runs between the schema and the methods (`mekd_fl.config` imports `mekd_fl.distill` once, to have the
built-in methods registered).
"""

from __future__ import annotations

from collections.abc import Collection

from mekd_fl.settings.schema import Setting

_DECLARED: dict[str, tuple[Setting, ...]] = {}
_version = 0  # bumped on every change, so that derived selections can be cached per state


def declare(method: str, settings: tuple[Setting, ...], taken: Collection[str] = ()) -> None:
    """Record the settings of `method` (replacing what it declared before).

    Refused, with the setting named: a setting another method or the run (`taken`) already declares
    (each setting is declared once), and a server-only setting (a method's losses run on the clients).
    """
    global _version
    others = {s.name for name, declared in _DECLARED.items() if name != method for s in declared}
    for s in settings:
        if not isinstance(s, Setting):
            raise TypeError(f"method {method!r}: settings must be Setting declarations, not {type(s).__name__}")
        if s.name in taken or s.name in others:
            raise ValueError(f"method {method!r}: setting {s.name!r} is already declared elsewhere")
        if not s.sent:
            raise ValueError(f"method {method!r}: setting {s.name!r} must reach the clients (audience client)")
    if len({s.name for s in settings}) != len(settings):
        raise ValueError(f"method {method!r}: a setting is declared twice")
    _DECLARED[method] = tuple(settings)
    _version += 1


def withdraw(method: str) -> None:
    """Forget a method and its settings (a plug-in unloaded, a test cleaning up)."""
    global _version
    if _DECLARED.pop(method, None) is not None:
        _version += 1


def method_names() -> tuple[str, ...]:
    """The registered methods, sorted: the accepted values of the `method` setting."""
    return tuple(sorted(_DECLARED))


def method_settings() -> tuple[Setting, ...]:
    """Every method's own settings: methods sorted by name, each method's in the order it declares them."""
    return tuple(s for name in sorted(_DECLARED) for s in _DECLARED[name])


def declared_by(method: str) -> tuple[Setting, ...]:
    """The settings `method` declares (none for an unknown method)."""
    return _DECLARED.get(method, ())


def owner(setting: str) -> str | None:
    """The method that declares `setting` (None for one of the run's own)."""
    return next((name for name, declared in _DECLARED.items() if any(s.name == setting for s in declared)), None)


def version() -> int:
    """A number that changes whenever the registered methods or their settings do."""
    return _version
