"""The edge side of MEKD as a public, Flower-free core: your images, your model, typed settings.

Why on its own: a device that distills from a blind teacher needs four steps (train its emulator,
choose its queries, distill on the teacher's answers, evaluate), and none of them needs Flower, the
project's RunConfig, its data split or its ResNets. `EdgeClient` takes
- the device's images: a uint8 tensor or array (N, C, H, W), a torch Dataset or a DataLoader (of
  images, (image, label) pairs or dicts, as flwr-datasets yields them); float images must lie in [0, 1]
  (what `ToTensor` gives), because queries travel as uint8, as a camera would send them;
- the student: an `nn.Module` (copied for every step) or a factory returning a fresh one, with the
  user's own state-dict keys;
- `preprocess`: images as floats in [0, 1] -> the model's input (e.g. torchvision's `Normalize`;
  default: none), the same hook `TeacherOracle(preprocess=...)` offers on the teacher's side;
- `EdgeSettings`: the client settings of a run, whose defaults are RunConfig's (there is one source).

Every step is a pure function of state dicts and tensors (weights in, weights and metrics out), so a
caller keeps the state where it likes: `mekd_fl.client.handlers` keeps it in Flower's `context.state`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mekd_fl.augment import to_unit
from mekd_fl.client.images import ImageSource, as_uint8_images
from mekd_fl.config import RunConfig
from mekd_fl.device import pick_device
from mekd_fl.distill import DistillContext, generator_input, get_distiller, teacher_codes
from mekd_fl.emulator import EmulatorConfig, build_emulator, from_gan_range, train_emulator
from mekd_fl.errors import ConfigError
from mekd_fl.fid import domain_fid, fixed_feature_net
from mekd_fl.models.gan import Generator
from mekd_fl.precision import autocast
from mekd_fl.queries import SCORED_SELECTIONS, entropy_scores, generated, select_queries
from mekd_fl.settings.schema import Setting
from mekd_fl.settings.values import SettingValues

__all__ = ["EdgeClient", "EdgeSettings", "as_uint8_images", "check_logits"]

StateDict = dict[str, torch.Tensor]
ModelSource = nn.Module | Callable[[], nn.Module]
Preprocess = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- settings
class EdgeSettings(SettingValues):
    """The settings of one edge device: the declared settings a client receives (audience "client" or
    "both"), less those only the project's own Flower client reads to build its data and model
    (`Setting.edge`: dataset, student-arch, run-name, emulator-fid), with the schema's names, defaults
    and checks. A registered method's own settings are in it. See the configuration table (docs/running.md) for each."""

    __slots__ = ()

    @classmethod
    def select(cls) -> tuple[Setting, ...]:
        return tuple(s for s in RunConfig.declared() if s.sent and s.edge)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> EdgeSettings:
        """Settings from a kebab- or snake-case mapping (a Flower ConfigRecord). Unknown keys are ignored
        (a strategy's own keys travel in the same record); known ones are checked as RunConfig checks them."""
        return cls().updated(config, **overrides)

    def updated(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> EdgeSettings:
        """A copy with the known keys of `config` (kebab- or snake-case) and `overrides` applied, checked."""
        values = {s.attr: self._values.get(s.attr, s.default) for s in self.declared()}
        for key, value in {**dict(config or {}), **overrides}.items():
            name = str(key).replace("-", "_")
            if name in values:
                values[name] = value
        settings = type(self)(**values)
        try:
            settings.check()
        except ConfigError as exc:
            raise ConfigError(f"edge settings: {exc}") from None
        return settings

    def emulator_config(self, steps: int | None, seed: int) -> EmulatorConfig:
        """The emulator's hyper-parameters from these settings, with this call's steps (None: emulator-steps)."""
        return EmulatorConfig.from_settings(self, seed=seed, **({} if steps is None else {"steps": steps}))

    def round_lr(self, server_round: int) -> float:
        """Cosine decay of the student's learning rate over the rounds (round 1 gets the full `lr`).

        Why: FedAvg with a constant rate keeps the averaged student oscillating between the clients'
        skewed optima under non-IID partitions; decaying it lets the last rounds settle.
        """
        progress = (server_round - 1) / max(self.num_rounds, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cpu(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu() for k, v in state.items()}


# ---------------------------------------------------------------------------- the client core
class EdgeClient:
    """One edge device: its unlabeled images, its student model and its settings.

    Parameters
    ----------
    images : the device's training images, used unlabeled (see `as_uint8_images` for what is accepted).
    model : the student, an nn.Module (deep-copied for each step) or a factory returning a new one.
    settings : EdgeSettings, or a mapping of client settings (kebab- or snake-case); default: RunConfig's.
    preprocess : a batch as floats in [0, 1] (B, C, H, W), on the device -> the model's input
        (e.g. torchvision's Normalize; default: the batch as it is).
    num_classes : the teacher's classes (default: the width of the model's output).
    client_id : an integer that seeds this device's emulator, queries and batches (a partition label).
    device : torch device (default: the settings' `device`, auto = cuda when present).
    mirror_views : whether augmented query views may be mirrored (not for digits: a mirrored 2 is no 2).
    labels : the images' true labels, read only by the `supervised` reference method.
    image_key : where dict samples keep their images.
    """

    def __init__(
        self,
        images: ImageSource,
        model: ModelSource,
        *,
        settings: Any = None,
        preprocess: Preprocess | None = None,
        num_classes: int | None = None,
        client_id: int = 0,
        device: torch.device | str | None = None,
        mirror_views: bool = False,
        labels: torch.Tensor | None = None,
        image_key: str | None = None,
    ) -> None:
        if settings is None or isinstance(settings, Mapping):
            settings = EdgeSettings.from_config(settings)
        if not isinstance(settings, EdgeSettings):
            raise TypeError(f"settings: an EdgeSettings or a mapping is accepted, not {type(settings).__name__}")
        if not (isinstance(model, nn.Module) or callable(model)):
            raise TypeError("model: an nn.Module or a factory returning one is accepted")
        self.settings = settings
        self.images = as_uint8_images(images, image_key)
        self.image_shape: tuple[int, int, int] = tuple(self.images.shape[1:])  # type: ignore[assignment]
        self._model = model
        self.preprocess: Preprocess = preprocess or _identity
        self.client_id = int(client_id)
        self.device = torch.device(device) if device is not None else pick_device(settings.device)
        self.mirror_views = mirror_views
        self.labels = labels
        self.num_classes = int(num_classes) if num_classes is not None else self._infer_classes()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """What the model is fed for uint8 images."""
        return self.preprocess(to_unit(images))

    def with_settings(self, settings: EdgeSettings) -> EdgeClient:
        """The same device (images and model, not copied) under other settings (those of one message)."""
        if settings == self.settings:
            return self
        other = copy.copy(self)
        other.settings = settings
        return other

    # ------------------------------------------------------------------ models
    def new_student(self) -> nn.Module:
        model = self._model
        student = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
        if not isinstance(student, nn.Module):
            raise TypeError(f"model factory returned {type(student).__name__}, not an nn.Module")
        return student

    def _student(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        student = self.new_student()
        try:
            student.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the global student does not fit this device's model: {first}") from None
        return student.to(self.device)

    def _infer_classes(self) -> int:
        student = self.new_student().to(self.device).eval()
        with torch.no_grad():
            out = student(self._input(self.images[:2].to(self.device)))
        if out.ndim != 2:
            raise ValueError(f"the model must return (batch, classes) logits; it returned shape {tuple(out.shape)}")
        check_logits(out)
        return int(out.shape[1])

    def new_generator(self) -> Generator:
        s = self.settings
        return build_emulator(self.num_classes, self.image_shape, s.emulator_width, kind=s.emulator)[0]

    def load_generator(self, state: Mapping[str, torch.Tensor]) -> Generator:
        gen = self.new_generator()
        gen.load_state_dict(state)
        return gen.to(self.device).eval()

    # ------------------------------------------------------------------ stage 1: emulation
    def train_emulator(
        self,
        g_state: StateDict | None = None,
        d_state: StateDict | None = None,
        steps: int | None = None,
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[StateDict, StateDict, dict[str, float]]:
        """Train (or continue from the given weights) this device's emulator GAN on its own images.

        With `pairs` = (query images, the teacher's answers to them) the emulator is paired: G learns to
        map each answer back to its image (`emulator-pairing=paired`), on the query set instead of the
        device's images; the answers enter G as the MEKD term feeds them (`emulator-input`).
        """
        s = self.settings
        images, codes = self.images, None
        if pairs is not None:
            images, responses = pairs
            if len(images) != len(responses) or not len(images):
                raise ValueError(f"paired emulator: {len(responses)} answers for {len(images)} query images")
            codes = teacher_codes(responses.float(), s.oracle_output, s.emulator_input, s.temperature)
        gen = disc = None
        if g_state is not None and d_state is not None:
            gen, disc = build_emulator(self.num_classes, self.image_shape, s.emulator_width, kind=s.emulator)
            gen.load_state_dict(g_state)
            disc.load_state_dict(d_state)
        t0 = time.time()
        cfg = s.emulator_config(steps, s.seed * 1000 + self.client_id)
        if codes is not None:
            cfg = dataclasses.replace(cfg, lr=s.emulator_pairing_lr)
        res = train_emulator(
            images,
            self.num_classes,
            cfg,
            self.device,
            gen,
            disc,
            codes=codes,
        )
        metrics = {
            "d-loss": res.d_loss,
            "g-loss": res.g_loss,
            "emulator-seconds": time.time() - t0,
            "num-examples": len(images),
        }
        return _cpu(res.generator.state_dict()), _cpu(res.discriminator.state_dict()), metrics

    def emulator_fid(self, g_state: StateDict, max_images: int = 2000) -> float:
        """Domain FID of G(z), z ~ N(0, I_C), against this device's own images (as many of each), in the
        features of a fixed, data-independent network built here: nothing is received for it."""
        net = fixed_feature_net(self.image_shape, seed=0)
        real = self.images[:max_images]
        gen = torch.Generator().manual_seed(self.settings.seed * 1000 + self.client_id + 1)
        fake = generated(self.load_generator(g_state), len(real), self.num_classes, gen)
        return domain_fid(net.to(self.device), real, fake, self.device)

    # ------------------------------------------------------------------ teacher queries
    def query_images(
        self, budget: int, g_state: StateDict | None = None, student_state: StateDict | None = None
    ) -> torch.Tensor:
        """What this device sends to the teacher (`query-source`, `query-views`, `query-fraction`,
        `query-selection`): round(query-fraction x images x views) images, at most `budget`.

        `student_state`: the global student that scores the images with `query-selection=uncertainty`
        or `hybrid` (without it, those selections are random)."""
        s = self.settings
        scorer = None
        if s.query_selection in SCORED_SELECTIONS and student_state is not None:
            scorer = lambda pool: entropy_scores(self.predict(student_state, pool))  # noqa: E731
        return select_queries(
            s.query_source,
            self.images,
            views=s.query_views,
            budget=budget,
            mirror=self.mirror_views,
            num_classes=self.num_classes,
            seed=s.seed * 1000 + self.client_id,
            generator=self.load_generator(g_state) if g_state is not None else None,
            fraction=s.query_fraction,
            selection=s.query_selection,
            device=self.device,
            scorer=scorer,
        )

    # ------------------------------------------------------------------ stage 2: distillation
    def distill(
        self,
        student_state: StateDict,
        images: torch.Tensor,
        responses: torch.Tensor,
        g_state: StateDict | None = None,
        server_round: int = 1,
        extra_state: StateDict | None = None,
        proximal_mu: float = 0.0,
    ) -> tuple[StateDict, dict[str, float], StateDict | None]:
        """Local distillation of the global student on (query image, teacher answer) pairs.

        Returns the new student weights, metrics and the method's own state (CAN's discriminator) to
        keep for the next round. Only a method that declares `uses_labels` (the supervised reference)
        gets the device's true labels, and it then trains on the device's own images instead.

        `proximal_mu` > 0 (Flower's FedProx sends it as `proximal-mu`) adds FedProx's proximal term to
        every step's loss exactly as Flower's FedProx documents it for its clients:
        (mu / 2) * sum over the student's parameters of ||w - w_global||_2, with w_global the global
        weights as received (the FedProx paper squares the norm; Flower's documented client does not).
        """
        number = isinstance(proximal_mu, (int, float)) and not isinstance(proximal_mu, bool)
        if not (number and math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"proximal-mu={proximal_mu!r} is not accepted; accepted: a finite number >= 0")
        s = self.settings
        torch.manual_seed(s.seed * 100_003 + self.client_id * 1009 + server_round)
        student = self._student(student_state).train()
        anchor = [p.detach().clone() for p in student.parameters()] if proximal_mu > 0 else []
        generator = self.load_generator(g_state) if g_state is not None else None
        distiller = get_distiller(s.method, DistillContext.from_config(s, self.num_classes, generator, self.device))
        if extra_state is not None:
            distiller.load_extra_state(extra_state)
        labels = None
        if distiller.uses_labels:
            if self.labels is None:
                raise ValueError(f"method={s.method!r} trains on true labels, and this device was given none")
            images, labels = self.images, torch.as_tensor(self.labels).to(self.device)
            responses = torch.zeros(len(images), self.num_classes)
        if len(images) != len(responses):
            raise ValueError(f"{len(responses)} teacher answers for {len(images)} query images")
        lr = s.round_lr(server_round)
        opt = torch.optim.SGD(
            student.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.momentum > 0
        )
        images_dev, responses_dev = images.to(self.device), responses.to(self.device)
        distiller.prepare(responses_dev)  # per-round work on the fixed answers (MEKD: G(T(x)) once)
        gen = torch.Generator().manual_seed(s.seed * 7919 + self.client_id * 31 + server_round)
        sums: dict[str, float] = {}
        steps, t0 = 0, time.time()
        batches = max(1, -(-len(images) // s.batch_size))
        for local_epoch in range(s.local_epochs):
            order = torch.randperm(len(images), generator=gen).to(self.device)
            for b, start in enumerate(range(0, len(images), s.batch_size)):
                idx = order[start : start + s.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a single image
                    continue
                # Progress in local epochs since the run began, from 1 (DKD's warm-up reads it).
                epoch = (server_round - 1) * s.local_epochs + local_epoch + (b + 1) / batches
                x = to_unit(images_dev[idx])
                with autocast(self.device, s.precision):  # bf16: the student's (and G(S(x))'s) forward
                    logits = student(self.preprocess(x)).float()
                    if steps == 0:  # the first batch: a model ending in softmax is refused, not trained to chance
                        check_logits(logits)
                    parts = distiller.losses(
                        logits,
                        responses_dev[idx],
                        x,
                        epoch,
                        labels[idx] if labels is not None else None,
                        **({"index": idx} if distiller.batch_index else {}),
                    )
                    synthetic = distiller.synthetic(responses_dev[idx])
                    if synthetic is not None:  # MEKD's query-free pairs (weight-synthetic)
                        s_images, s_targets = synthetic
                        s_logits = student(self.preprocess(s_images)).float()
                        parts["synthetic"] = distiller.synthetic_loss(s_logits, s_targets)
                        parts["loss"] = parts["loss"] + parts["synthetic"]
                if anchor:
                    prox = sum((p - a).norm(2) for p, a in zip(student.parameters(), anchor))
                    parts["proximal"] = proximal_mu / 2 * prox
                    parts["loss"] = parts["loss"] + parts["proximal"]
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                steps += 1
        metrics = {f"train-{k}": v / max(steps, 1) for k, v in sums.items()}
        metrics.update({"num-examples": len(images), "lr": lr, "steps": steps, "train-seconds": time.time() - t0})
        extra = distiller.extra_state()
        return _cpu(student.state_dict()), metrics, (_cpu(extra) if extra is not None else None)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, student_state: StateDict, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """The student's logits on uint8 images (CPU).

        The first batch is checked with `check_logits`: with `num_classes` given, this can be the model's
        first forward (uncertainty-scored queries, evaluation), before any distillation."""
        student = self._student(student_state).eval()
        out = [
            student(self._input(images[i : i + batch_size].to(self.device))).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        if out:
            check_logits(out[0])
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def evaluate(self, student_state: StateDict, images: ImageSource, labels: torch.Tensor) -> dict[str, float]:
        """Accuracy and loss of the global student on held-out labeled images (labels used only here)."""
        images = as_uint8_images(images) if len(images) else torch.empty(0, *self.image_shape, dtype=torch.uint8)
        labels = torch.as_tensor(labels).long()
        if len(labels) == 0:
            return {"accuracy": 0.0, "loss": 0.0, "num-examples": 0}
        logits = self.predict(student_state, images)
        loss = nn.functional.cross_entropy(logits, labels).item()
        return {
            "accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "loss": loss,
            "num-examples": len(labels),
        }

    @torch.no_grad()
    def emulator_samples(
        self, student_state: StateDict, g_state: StateDict, images: torch.Tensor, responses: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """x, G(T(x)) and G(S(x)) as uint8 images: what the emulation term compares."""
        s = self.settings
        gen = self.load_generator(g_state)
        s_logits = self.predict(student_state, images).to(self.device)
        responses = responses.to(self.device)
        s_scores = s_logits if s.oracle_output == "logits" else s_logits.log_softmax(1)
        g_t = gen(teacher_codes(responses, s.oracle_output, s.emulator_input, s.temperature))
        g_s = gen(generator_input(s_scores, s.emulator_input, s.temperature))
        return {"images": images.cpu(), "g-teacher": from_gan_range(g_t).cpu(), "g-student": from_gan_range(g_s).cpu()}


def check_logits(outputs: torch.Tensor) -> None:
    """Refuse, in one line, a model whose outputs are probabilities: every row non-negative and summing to
    1. Distillation treats the model's output as logits; a softmax output trains to chance in silence."""
    rows = outputs.detach().float()
    # atol 1e-2: a softmax computed in bf16 (precision=bf16) sums to 1 only within ~2e-3; logits whose every
    # row is non-negative and sums to 1 within 1e-2 do not occur outside a probability output.
    if rows.ndim == 2 and rows.shape[1] > 1 and len(rows) and bool((rows >= 0).all()):
        if bool(torch.allclose(rows.sum(1), torch.ones(len(rows), device=rows.device), atol=1e-2)):
            raise ValueError(
                "the model returns probabilities (rows >= 0 summing to 1); accepted: a model that returns "
                "logits (remove its final softmax)"
            )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
