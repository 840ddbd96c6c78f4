"""One typed run configuration, derived from the settings schema: merging from Flower run-config / CLI /
YAML, validation, the client allow-list and the generated tables.

Why derived: every setting is declared once (`mekd_fl.settings`: the run's own in `settings/run.py`, each
distillation method's in its own file), with its name, type, default, help, accepted values and who
receives it. RunConfig, `CLIENT_SETTINGS`, EdgeSettings, DistillContext, EmulatorConfig, pyproject's
`[tool.flwr.app.config]` (`python -m mekd_fl.config --pyproject`) and the docs' table
(`python -m mekd_fl.config`) are read from the declarations, so none of them is a copy to keep equal.

Importing this module loads neither torch nor Flower; the distillation methods (whose files declare
their settings) are loaded the first time a RunConfig is built or asked for its settings. That import
is here, in the facade above both, and not in `mekd_fl.settings`: the methods import the schema, so a
schema importing the methods would be an import cycle.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mekd_fl.errors import ConfigError
from mekd_fl.settings import methods
from mekd_fl.settings.checks import resolved_pairing
from mekd_fl.settings.run import METHOD_SETTINGS_AFTER, RUN_SETTINGS
from mekd_fl.settings.schema import Setting
from mekd_fl.settings.values import SettingValues

READ_BY = {"server": "server", "client": "clients", "both": "server, clients"}
_ALL: dict[int, tuple[Setting, ...]] = {}


def load_methods() -> None:
    """Register the built-in distillation methods, and so their settings (once: Python caches modules)."""
    import mekd_fl.distill  # noqa: F401  (registration side effect)


def all_settings() -> tuple[Setting, ...]:
    """Every setting in table order: the run's own, with the registered methods' after METHOD_SETTINGS_AFTER."""
    load_methods()
    version = methods.version()
    if version not in _ALL:
        cut = next(i for i, s in enumerate(RUN_SETTINGS) if s.name == METHOD_SETTINGS_AFTER) + 1
        _ALL.clear()
        _ALL[version] = RUN_SETTINGS[:cut] + methods.method_settings() + RUN_SETTINGS[cut:]
    return _ALL[version]


class RunConfig(SettingValues):
    """Every setting of a run, read as attributes in snake_case (`cfg.local_epochs`), in table order."""

    __slots__ = ()

    @classmethod
    def select(cls) -> tuple[Setting, ...]:
        return all_settings()

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        """All setting names in kebab-case, in table order."""
        return [s.name for s in cls.declared()]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, validate: bool = True) -> RunConfig:
        """Build from kebab- or snake-case keys (Flower run-config, YAML, CLI) over the defaults.

        Unknown keys are an error rather than ignored: a typo must not silently run the default.
        """
        known = {s.attr: s for s in cls.declared()}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown setting '{raw_key}'; accepted: {', '.join(cls.keys())}")
            kwargs[key] = known[key].coerce(value, str(raw_key))
        cfg = cls(**kwargs)
        if validate:
            cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def client_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of only the settings a client receives (`CLIENT_SETTINGS`).

        Why by audience: a client is not trusted with the server's side of a run. It never receives the
        teacher's settings (teacher-*), the size of the server's labeled share (server-share), server
        paths (cache-dir, out-dir, data-dir), partition settings (its partition arrives as its own
        shard), budgets (query-budget: the server counts them) or the robustness and privacy settings of
        the aggregation. A setting reaches the clients only when its declaration says audience "client"
        or "both".
        """
        values = self.to_dict()
        return {s.name: values[s.name] for s in self.declared() if s.sent}

    # ------------------------------------------------------------------ validation
    def validate(self, client: bool = False) -> None:
        """Reject bad settings with one line naming the setting and what is accepted.

        Each setting's own rule (type, choices, range) is declared with it; the checks of combinations
        are in `mekd_fl.settings.checks`. `client=True` (an edge device checking the settings it was
        sent) leaves the server's settings, which a client is never sent, unjudged.

        Only cheap checks live here (no data decoding) so a run fails in well under a second; the
        checks that need the machine (device, writable folders) are in `mekd_fl.server.preflight`.
        """
        self.check(skip=[s for s in self.declared() if not s.sent] if client else ())

    # ------------------------------------------------------------------ derived values
    @property
    def pairing(self) -> str:
        """emulator-pairing with auto resolved (`settings.checks.resolved_pairing`): paired or none."""
        return resolved_pairing(self)

    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("MEKD_FL_CACHE") or str(Path.home() / ".cache" / "mekd-fl")
        return Path(base).expanduser()


def client_settings() -> tuple[str, ...]:
    """The settings a client receives, in kebab-case: those whose audience is "client" or "both"."""
    return tuple(s.name for s in RunConfig.declared() if s.sent)


def __getattr__(name: str) -> Any:
    """`CLIENT_SETTINGS` and `METHODS`, derived when asked for (they need the registered methods, whose
    files import torch, and a method registered later, by a plug-in, must be in them)."""
    if name == "CLIENT_SETTINGS":
        return client_settings()
    if name == "METHODS":
        load_methods()
        return methods.method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_flower_config() -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table that pyproject.toml holds, as a mapping."""
    return RunConfig().to_dict()


def pyproject_table() -> str:
    """pyproject.toml's `[tool.flwr.app.config]` block, generated (`python -m mekd_fl.config --pyproject`)."""
    lines = [
        "[tool.flwr.app.config]",
        "# Every run setting with its default, generated from the settings schema",
        "# (`python -m mekd_fl.config --pyproject`; tests/test_config.py checks this block equals it).",
    ]
    lines += [f"{s.name} = {s.toml_default()}" for s in RunConfig.declared()]
    return "\n".join(lines) + "\n"


def settings_table() -> str:
    """The configuration table of docs/running.md, generated from the declarations (`python -m mekd_fl.config`)."""
    rows = ["| setting | default | read by | meaning |", "|---|---|---|---|"]
    for s in RunConfig.declared():
        owner = methods.owner(s.name)
        read_by = READ_BY[s.audience] + (f" (method {owner})" if owner else "")
        rows.append(f"| `{s.name}` | `{json.dumps(s.default)}` | {read_by} | {s.meaning()} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mekd_fl.config", description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", action="store_true", help="print pyproject's [tool.flwr.app.config] block")
    args = parser.parse_args(argv)
    if args.pyproject:
        print(pyproject_table(), end="")
    else:
        print(settings_table())


if __name__ == "__main__":
    main()
