"""One interface for every distillation method, and the registry that finds them by name.

Why a registry: the client and the strategy never branch on the method's name. A method is a class
with `losses(student_logits, teacher_response, images, epoch, labels=None)` and the hyperparameters it
reads declared beside it (`settings = (Setting("dkd-alpha", ...), ...)`); adding one is a new file with
`@register("name")`, nothing else changes: the registration puts its settings in the schema, so
RunConfig, the pyproject and docs tables, the clients' settings and DistillContext all carry them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mekd_fl.errors import ConfigError
from mekd_fl.settings.methods import declare, method_settings, owner, withdraw
from mekd_fl.settings.run import RUN_SETTINGS
from mekd_fl.settings.schema import Setting
from mekd_fl.settings.values import SettingValues


class DistillContext(SettingValues):
    """What a method may use besides the batch: settings, and the client's own emulator if any.

    The settings are those the methods read: the run's shared ones (`distill=True`: temperature, what
    the oracle answers) and every registered method's own, with their declared defaults; a method reads
    them as attributes (`ctx.dkd_alpha`). Besides: `num_classes`, `generator` (the client's frozen
    emulator G, for MEKD) and `device` (a torch device).
    """

    __slots__ = ()
    extras = ("num_classes", "generator", "device")
    num_classes: int
    generator: nn.Module | None
    device: torch.device | str

    @classmethod
    def select(cls) -> tuple[Setting, ...]:
        return (*(s for s in RUN_SETTINGS if s.distill), *method_settings())

    def __init__(
        self,
        num_classes: int,
        generator: nn.Module | None = None,
        device: torch.device | str = "cpu",
        **settings: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, generator=generator, device=device, **settings)

    @classmethod
    def from_config(
        cls, cfg: Any, num_classes: int, generator: nn.Module | None = None, device: torch.device | str = "cpu"
    ) -> DistillContext:
        """Take every setting of the context from a RunConfig or EdgeSettings (attributes of the same name)."""
        values = {s.attr: getattr(cfg, s.attr) for s in cls.declared()}
        return cls(num_classes=num_classes, generator=generator, device=device, **values)


def teacher_log_probs(response: torch.Tensor, oracle_output: str) -> torch.Tensor:
    """log p_T from what the oracle answered.

    With probabilities the logits are known only up to a per-sample constant, and log p is exactly
    such a shift of them, so softmax(log p / T) equals softmax(logits / T): temperature scaling works
    the same whichever form the oracle returns.
    """
    if oracle_output == "probs":
        # Clamp only what the dtype cannot represent (exact zeros): a fixed floor such as 1e-12 lifts the
        # small probabilities a confident float32 teacher really gives, and distorts every loss that
        # reads them (DKD by up to 14 %, KD by 9 %, at a logit spread of about 10).
        floor = torch.finfo(response.dtype).tiny if response.dtype.is_floating_point else 1e-38
        return response.clamp_min(floor).log()
    return F.log_softmax(response, dim=1)


def kl_divergence(teacher_log_p: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL(softmax(t_T/T) || softmax(t_S/T)) * T^2, summed over classes, mean over the batch."""
    t = temperature
    log_pt = F.log_softmax(teacher_log_p / t, dim=1)
    log_ps = F.log_softmax(student_logits / t, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * t * t


class Distiller:
    """Base class. `losses` returns named parts; the key "loss" is the one the student minimises.

    `epoch` is the run's progress in local epochs, starting at 1 (for warm-ups); `labels` is passed
    only to methods that declare `uses_labels` (the supervised reference, which breaks the rule).
    Methods with trainable parts of their own (CAN's discriminator) update them inside `losses` and
    expose them through `extra_state` so the client can keep them between rounds.

    Per-round work: the client calls `prepare(responses)` once with all the round's teacher answers
    before the steps (they are fixed within a round). A method that declares `batch_index` then also
    gets `index=`, the rows of `responses` the batch holds, so it can read what it precomputed (MEKD's
    G(T(x))); without a `prepare` call, or without `index`, `losses` must compute everything itself.
    """

    name: ClassVar[str] = ""
    #: The method's own hyperparameters, declared here and nowhere else (audience "client": the losses
    #: run on the clients); `register` adds them to the settings schema.
    settings: ClassVar[tuple[Setting, ...]] = ()
    needs_generator: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = False
    batch_index: ClassVar[bool] = False  # whether `losses` takes index= (rows of what `prepare` was given)
    #: Other methods whose settings this one's loss reads besides its own and its parents' (MEKD on
    #: DKD reads DKD's), so that `runs_with` keeps them.
    reads_settings_of: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def runs_with(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """A run's settings (`RunConfig.to_dict()`) as this method runs with them: the settings of other
        methods, which its loss never reads, left out, and the method's own sentinels resolved.

        Why: two runs that differ only there are the same run. A bench resumes a finished KD cell whose
        spec now gives MEKD's weight-emulation another value, or its default a new meaning, and refuses a
        MEKD cell whose weight really changed.
        """
        mine = {vars(c).get("name") for c in cls.__mro__} | set(cls.reads_settings_of)
        return {k: v for k, v in values.items() if (declared_by := owner(k)) is None or declared_by in mine}

    def __init__(self, ctx: DistillContext) -> None:
        self.ctx = ctx

    def losses(
        self,
        student_logits: torch.Tensor,
        teacher_response: torch.Tensor,
        images: torch.Tensor,
        epoch: float,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, responses: torch.Tensor) -> None:
        """Once per round, before the steps: all the teacher answers that `losses` will see (default: nothing)."""

    def synthetic(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra (images in [0, 1], target probabilities) to distill on beside the batch, made without a
        query (MEKD's synthesised pairs); None: none (the default). The client adds `synthetic_loss`."""
        return None

    def synthetic_loss(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of the student's logits on `synthetic`'s images against its target probabilities."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor] | None:
        """Weights of the method's own trainable parts, to persist between rounds (None: nothing)."""
        return None

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state` returned in an earlier round."""


_REGISTRY: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a Distiller available as `method=name`, with the settings it declares itself
    (`vars(cls)`, so a subclass of another method does not declare its parent's settings twice)."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        declare(name, tuple(vars(cls).get("settings", ())), taken={s.name for s in RUN_SETTINGS})
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove a method and its settings (a test's toy method, a plug-in being unloaded)."""
    _REGISTRY.pop(name, None)
    withdraw(name)


def methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def needs_generator(name: str) -> bool:
    """Whether a method distills through the client's emulator (so the emulator phase must run)."""
    get_class(name)
    return _REGISTRY[name].needs_generator


def get_class(name: str) -> type[Distiller]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method={name!r} is not accepted; accepted: {', '.join(methods())}") from None


def get_distiller(name: str, ctx: DistillContext) -> Distiller:
    cls = get_class(name)
    if cls.needs_generator and ctx.generator is None:
        raise ValueError(f"method={name!r} needs the client's emulator generator")
    return cls(ctx)
