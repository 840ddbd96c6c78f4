"""The settings schema: every setting of a run declared once, and what is derived from the declarations.

- `schema`: the `Setting` type (name, type by its default, help, accepted values, who receives it)
  and the one-line refusals of a single value;
- `run`: the declarations of the run's own settings (data, teacher, emulator, queries, rounds, server);
- `methods`: the distillation methods' names and the settings each declares in its own file
  (`mekd_fl/distill/<method>.py`), filled by `mekd_fl.distill.base.register`;
- `checks`: the rules that read two or more settings, as small named functions;
- `values`: the immutable value objects built over a selection of the settings (RunConfig, EdgeSettings,
  DistillContext) and their validation.

`mekd_fl.config` puts them together: it loads the built-in methods (so their settings are declared) and
derives RunConfig, the client settings and the tables. This package imports no method and no torch at
import time: the methods import it (`mekd_fl.distill.base`), so it must stay below them.
"""
