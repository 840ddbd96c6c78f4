"""The edge device: local mapping emulation, query selection, distillation and evaluation.

Plain PyTorch on purpose (no Flower here): state dicts and tensors in, state dicts and metrics out,
so every step is testable without a runtime. `client_app.py` is the thin Flower shell around it.
The client never reads a training label: it gets its images from `LocalData.images`, and its
labels exist only in the held-out split used to *measure* the global student (and for the
`supervised` reference, which breaks the source-blind rule on purpose). Its settings are the client
settings of `RunConfig` (`CLIENT_SETTINGS`); it never sees the teacher's settings or server paths.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from mekd_fl.config import RunConfig
from mekd_fl.distill import DistillContext, get_distiller, teacher_log_probs
from mekd_fl.distill.mekd import generator_input
from mekd_fl.emulator import EmulatorConfig, build_emulator, from_gan_range, train_emulator
from mekd_fl.data.local import LocalData
from mekd_fl.fid import domain_fid, fixed_feature_net
from mekd_fl.models.gan import Generator
from mekd_fl.queries import generated, select_queries
from mekd_fl.teacher import build_model, predict_logits

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EdgeDevice:
    """One client's view of a run: its settings, its unlabeled images and its evaluation split."""

    cfg: RunConfig
    partition_id: int
    device: torch.device
    local: LocalData

    @property
    def images(self) -> torch.Tensor:
        return self.local.images

    # ------------------------------------------------------------------ models
    def new_student(self) -> nn.Module:
        ds = self.local
        return build_model(self.cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)

    def new_generator(self) -> Generator:
        ds = self.local
        return build_emulator(ds.num_classes, ds.image_shape, self.cfg.emulator_width, kind=self.cfg.emulator)[0]

    def load_generator(self, state: StateDict) -> Generator:
        gen = self.new_generator()
        gen.load_state_dict(state)
        return gen.to(self.device).eval()

    # ------------------------------------------------------------------ stage 1: emulation
    def emulator_config(self, steps: int | None = None) -> EmulatorConfig:
        cfg = self.cfg
        return EmulatorConfig(steps=cfg.emulator_steps if steps is None else steps,
                              batch_size=cfg.emulator_batch_size, lr=cfg.emulator_lr, width=cfg.emulator_width,
                              seed=cfg.seed * 1000 + self.partition_id, kind=cfg.emulator,
                              n_critic=cfg.wgan_n_critic, gp_lambda=cfg.wgan_gp_lambda, info_weight=cfg.infogan_weight)

    def train_emulator(self, g_state: StateDict | None = None, d_state: StateDict | None = None,
                       steps: int | None = None) -> tuple[StateDict, StateDict, dict[str, float]]:
        """Train (or continue from the given weights) this client's emulator GAN on its own images."""
        ds = self.local
        gen = disc = None
        if g_state is not None and d_state is not None:
            gen, disc = build_emulator(ds.num_classes, ds.image_shape, self.cfg.emulator_width, kind=self.cfg.emulator)
            gen.load_state_dict(g_state)
            disc.load_state_dict(d_state)
        t0 = time.time()
        res = train_emulator(self.images, ds.num_classes, self.emulator_config(steps), self.device, gen, disc)
        metrics = {"d-loss": res.d_loss, "g-loss": res.g_loss, "emulator-seconds": time.time() - t0,
                   "num-examples": len(self.images)}
        return _cpu(res.generator.state_dict()), _cpu(res.discriminator.state_dict()), metrics

    def emulator_fid(self, g_state: StateDict, max_images: int = 2000) -> float:
        """Domain FID of G(z), z ~ N(0, I_C), against this client's own images (as many of each), in the
        features of a fixed, data-independent network built here: nothing is received for it."""
        ds = self.local
        net = fixed_feature_net(ds.image_shape, seed=0)
        real = self.images[:max_images]
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.partition_id + 1)
        fake = generated(self.load_generator(g_state), len(real), ds.num_classes, gen)
        return domain_fid(net.to(self.device), real, fake, self.device)

    # ------------------------------------------------------------------ teacher queries
    def query_images(self, budget: int, g_state: StateDict | None = None) -> torch.Tensor:
        """What this client sends to the teacher (`query-source`, `query-views`), at most `budget` images."""
        cfg, ds = self.cfg, self.local
        return select_queries(cfg.query_source, self.images, views=cfg.query_views, budget=budget,
                              dataset=ds.name, num_classes=ds.num_classes, seed=cfg.seed * 1000 + self.partition_id,
                              generator=self.load_generator(g_state) if g_state is not None else None)

    # ------------------------------------------------------------------ stage 2: distillation
    def distill(self, student_state: StateDict, g_state: StateDict | None, images: torch.Tensor,
                responses: torch.Tensor, server_round: int, extra_state: StateDict | None = None,
                ) -> tuple[StateDict, dict[str, float], StateDict | None]:
        """Local distillation of the global student on (query image, teacher answer) pairs.

        Returns the new student weights, metrics and the method's own state (CAN's discriminator) to
        keep for the next round. Only a method that declares `uses_labels` (the supervised reference)
        gets the client's true labels, and it then trains on the client's own images instead.
        """
        cfg, ds = self.cfg, self.local
        torch.manual_seed(cfg.seed * 100_003 + self.partition_id * 1009 + server_round)
        student = self.new_student()
        student.load_state_dict(student_state)
        student.to(self.device).train()
        generator = self.load_generator(g_state) if g_state is not None else None
        distiller = get_distiller(cfg.method, DistillContext.from_config(cfg, ds.num_classes, generator, self.device))
        if extra_state is not None:
            distiller.load_extra_state(extra_state)
        labels = None
        if distiller.uses_labels:
            images = self.images
            labels = self.local.labels.to(self.device)
            responses = torch.zeros(len(images), ds.num_classes)
        lr = round_lr(cfg, server_round)
        opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        images_dev, responses_dev = images.to(self.device), responses.to(self.device)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.partition_id * 31 + server_round)
        sums: dict[str, float] = {}
        steps, t0 = 0, time.time()
        batches = max(1, -(-len(images) // cfg.batch_size))
        for local_epoch in range(cfg.local_epochs):
            order = torch.randperm(len(images), generator=gen).to(self.device)
            for b, start in enumerate(range(0, len(images), cfg.batch_size)):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a single image
                    continue
                # Progress in local epochs since the run began, from 1 (DKD's warm-up reads it).
                epoch = (server_round - 1) * cfg.local_epochs + local_epoch + (b + 1) / batches
                x = images_dev[idx].float().div_(255.0)
                parts = distiller.losses(student(x), responses_dev[idx], x, epoch,
                                         labels[idx] if labels is not None else None)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                steps += 1
        metrics = {f"train-{k}": v / max(steps, 1) for k, v in sums.items()}
        metrics.update({"num-examples": len(images), "lr": lr, "steps": steps,
                        "train-seconds": time.time() - t0})
        extra = distiller.extra_state()
        return _cpu(student.state_dict()), metrics, (_cpu(extra) if extra is not None else None)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, student_state: StateDict) -> dict[str, float]:
        """Accuracy of the global student on this client's held-out split (labels used only here)."""
        images, labels = self.local.test_images, self.local.test_labels
        student = self.new_student()
        student.load_state_dict(student_state)
        logits = predict_logits(student.to(self.device), images, self.device)
        if len(labels) == 0:
            return {"accuracy": 0.0, "loss": 0.0, "num-examples": 0}
        loss = nn.functional.cross_entropy(logits, labels).item()
        return {"accuracy": (logits.argmax(1) == labels).float().mean().item(), "loss": loss,
                "num-examples": len(labels)}

    @torch.no_grad()
    def emulator_samples(self, student_state: StateDict, g_state: StateDict, images: torch.Tensor,
                         responses: torch.Tensor) -> dict[str, torch.Tensor]:
        """x, G(T(x)) and G(S(x)) as uint8 images: what the emulation term compares."""
        cfg = self.cfg
        gen = self.load_generator(g_state)
        student = self.new_student()
        student.load_state_dict(student_state)
        s_logits = predict_logits(student.to(self.device), images, self.device).to(self.device)
        responses = responses.to(self.device)
        raw = cfg.oracle_output == "logits"
        t_scores = responses if raw else teacher_log_probs(responses, "probs")
        s_scores = s_logits if raw else s_logits.log_softmax(1)
        g_t = gen(generator_input(t_scores, cfg.emulator_input, cfg.temperature))
        g_s = gen(generator_input(s_scores, cfg.emulator_input, cfg.temperature))
        return {"images": images.cpu(), "g-teacher": from_gan_range(g_t).cpu(), "g-student": from_gan_range(g_s).cpu()}


def round_lr(cfg: RunConfig, server_round: int) -> float:
    """Cosine decay of the student's learning rate over the rounds (round 1 gets the full `lr`).

    Why: FedAvg with a constant rate keeps the averaged student oscillating between the clients'
    skewed optima under non-IID partitions; decaying it lets the last rounds settle.
    """
    progress = (server_round - 1) / max(cfg.num_rounds, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cpu(state: StateDict) -> StateDict:
    return {k: v.detach().cpu() for k, v in state.items()}
