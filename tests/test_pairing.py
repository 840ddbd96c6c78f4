"""Paired emulators (`emulator-pairing=paired`) and the fidelity diagnostic that measures them.

The question behind both: does G(T(x)) depend on what the teacher said? An unconditional GAN on
z ~ N(0, I_C) ties no input direction to a class; trained on the client's own (answer, image) pairs,
G inverts the teacher, which the emulation term assumes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from mekd_fl.client.edge import EdgeClient
from mekd_fl.config import RunConfig
from mekd_fl.emulator import EmulatorConfig, build_emulator, from_gan_range, train_emulator
from mekd_fl.errors import ConfigError
from mekd_fl.fidelity import class_separation, emulator_fidelity
from strategies import protocol as P
from strategies.phases import EmulatorPlan
from tests.scripted_clients import RecordingGrid, honest, mekd, node_id, student, with_emulator

pytestmark = pytest.mark.usefixtures("task_identity")

CPU = torch.device("cpu")
C = 6


def _templates() -> torch.Tensor:
    """Six 8x8 images, class c a bright row c + 1: what a toy teacher tells apart."""
    t = torch.zeros(C, 1, 8, 8)
    for c in range(C):
        t[c, :, 1 + c, :] = 200.0
    return t


def _toy(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % C
    images = (_templates()[labels] + torch.rand(n, 1, 8, 8, generator=gen) * 50).round().to(torch.uint8)
    return images, labels


def _toy_teacher(images: torch.Tensor) -> torch.Tensor:
    """Softmax over negative distances to the class templates: a confident, exact toy teacher."""
    d = (images.float().flatten(1)[:, None] - _templates().flatten(1)[None]).div(255).square().sum(-1)
    return (-2 * d).softmax(1)


# ---------------------------------------------------------------------------- pairing on a toy problem
@pytest.mark.parametrize("gan", [False, True])  # the reconstruction alone (the default), and beside a GAN
def test_pairing_makes_the_teacher_recognise_its_class_in_g_of_its_answer(gan: bool) -> None:
    images, labels = _toy()
    answers = _toy_teacher(images)
    assert (answers.argmax(1) == labels).all()
    consistency = {}
    for seed in (1, 2):
        for name, codes in (("unpaired", None), ("paired", answers)):
            cfg = EmulatorConfig(
                steps=80, batch_size=32, width=8, seed=seed, kind="dcgan", pairing_weight=10.0, pairing_gan=gan
            )
            g = train_emulator(images, C, cfg, CPU, codes=codes).generator
            with torch.no_grad():
                emulated = from_gan_range(g(answers))
            fid = emulator_fidelity(_toy_teacher, images, emulated)
            consistency[name, seed] = fid["consistency"]
    for seed in (1, 2):
        assert consistency["paired", seed] >= 0.9, consistency
        assert consistency["unpaired", seed] <= 0.5, consistency


@pytest.mark.parametrize("kind", ["wgan-gp", "infogan"])
def test_every_emulator_kind_trains_paired(kind: str) -> None:
    images, _ = _toy(64)
    cfg = EmulatorConfig(steps=2, batch_size=16, width=8, seed=0, kind=kind, n_critic=2, pairing_gan=True)
    res = train_emulator(images, C, cfg, CPU, codes=_toy_teacher(images))
    assert np.isfinite([res.d_loss, res.g_loss]).all()


def test_paired_without_the_gan_term_trains_g_alone_on_the_reconstruction() -> None:
    images, _ = _toy(64)
    cfg = EmulatorConfig(steps=5, batch_size=16, width=8, seed=0, pairing_weight=2.0)
    assert cfg.pairing_gan is False  # the default
    _, d_fresh = build_emulator(C, (1, 8, 8), 8)
    d_before = {k: v.clone() for k, v in d_fresh.state_dict().items()}
    res = train_emulator(images, C, cfg, CPU, discriminator=d_fresh, codes=_toy_teacher(images))
    assert all(torch.equal(d_before[k], v) for k, v in res.discriminator.state_dict().items())  # D untouched
    assert res.d_loss == 0.0
    with torch.no_grad():  # g_loss is the weighted L1 of the last step(s): the same order as 2 * |G(T(x)) - x|
        l1 = (res.generator(_toy_teacher(images)) - images.float().div(127.5).sub(1)).abs().mean().item()
    assert 0 < res.g_loss < 2 * 2.0 and abs(res.g_loss - 2.0 * l1) < 0.5
    with_gan = train_emulator(images, C, dataclasses.replace(cfg, pairing_gan=True), CPU, codes=_toy_teacher(images))
    assert with_gan.d_loss > 0


def test_unpaired_training_is_unchanged_by_the_pairing_code() -> None:
    """The pairing weight alone must not change an unpaired emulator (the paper's GAN is kept as it was)."""
    images, _ = _toy(64)
    cfg = EmulatorConfig(steps=3, batch_size=16, width=8, seed=3)
    a = train_emulator(images, C, cfg, CPU).generator.state_dict()
    b = train_emulator(images, C, dataclasses.replace(cfg, pairing_weight=123.0), CPU).generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shape", [(10, C), (64, C + 1), (64,)])
def test_codes_that_do_not_match_the_images_are_refused(shape: tuple) -> None:
    images, _ = _toy(64)
    with pytest.raises(ValueError, match="one per image"):
        train_emulator(images, C, EmulatorConfig(steps=1, width=8), CPU, codes=torch.zeros(shape))


def test_edge_client_trains_on_the_pairs_it_is_given() -> None:
    images, _ = _toy(64)
    edge = EdgeClient(images, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, C)), settings={"seed": 1})
    settings = {"emulator_steps": 2, "emulator_width": 8}
    edge = edge.with_settings(edge.settings.updated(settings))
    _, _, metrics = edge.train_emulator(pairs=(images[:40], _toy_teacher(images[:40])))
    assert metrics["num-examples"] == 40  # the query set, not the device's 64 images
    with pytest.raises(ValueError, match="answers for"):
        edge.train_emulator(pairs=(images[:40], _toy_teacher(images[:30])))


def test_auto_pairing_pairs_where_the_queries_are_the_clients_own_images() -> None:
    assert RunConfig().emulator_pairing == "auto" and RunConfig().pairing == "paired"
    assert RunConfig(query_source="generated").pairing == "none"
    assert RunConfig(query_source="mixed").pairing == "none"
    assert RunConfig(emulator_pairing="none").pairing == "none"
    # a federated average of paired Gs would carry other clients' answers to every client: auto keeps it unpaired
    assert RunConfig(federated_emulator=True).pairing == "none"
    assert RunConfig(federated_emulator=True, emulator_pairing="paired").pairing == "paired"  # explicit choice
    plan = EmulatorPlan(federated=True)
    plan.check()
    assert plan.pairing == "none" and plan.paired == {}
    plan = EmulatorPlan()
    plan.check()
    assert plan.pairing == "paired" and plan.paired == {P.PAIRED: True}
    RunConfig(query_source="generated").validate()  # auto never asks for what cannot be paired


def test_paired_needs_local_queries() -> None:
    with pytest.raises(ConfigError, match="emulator-pairing=paired.*query-source=generated"):
        RunConfig(emulator_pairing="paired", query_source="generated").validate()
    with pytest.raises(ConfigError, match="emulator-pairing-weight"):
        RunConfig(emulator_pairing_weight=0.0).validate()


# ---------------------------------------------------------------------------- the strategy's phase order
def _run(pairing: str) -> RecordingGrid:
    grid = RecordingGrid({node_id(i): with_emulator(honest(i, images=4)) for i in range(3)})
    s = mekd(n=3, emulator_pairing=pairing)
    s.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in student().items()}),
        num_rounds=1,
        train_config=ConfigRecord({"lr": 0.1}),
        num_nodes=3,
    )
    return grid


@pytest.mark.parametrize("pairing", ["none", "paired"])
def test_paired_clients_query_before_their_emulator_is_trained(pairing: str) -> None:
    grid = _run(pairing)
    for i in range(3):
        kinds = [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == node_id(i)]
        first = [k for k in kinds if k in (P.EMULATOR, P.QUERY, P.ANSWERS)]
        if pairing == "paired":
            assert first == [P.QUERY, P.ANSWERS, P.EMULATOR]
        else:
            assert first == [P.EMULATOR, P.QUERY, P.ANSWERS]
    flags = {bool(m.content[P.CONFIG].get(P.PAIRED, False)) for m in grid.sent_of(P.EMULATOR)}
    assert flags == {pairing == "paired"}


# ---------------------------------------------------------------------------- the diagnostic's formulas
def test_fidelity_numbers_equal_their_definitions() -> None:
    images, labels = _toy(60)
    perfect = emulator_fidelity(_toy_teacher, images, images, images)
    assert perfect["consistency"] == 1.0 and perfect["student-distance"] == 0.0
    assert perfect["class-separation"] == perfect["real-class-separation"]
    # One figure for every answer: consistency is the share of the class that figure shows, separation 0.
    same = images[:1].expand_as(images).clone()
    collapsed = emulator_fidelity(_toy_teacher, images, same)
    assert collapsed["consistency"] == pytest.approx(1 / C) and collapsed["class-separation"] == 0.0
    assert collapsed["majority-share"] == pytest.approx(1 / C)
    # On a skewed sample one figure of the main class scores that class's share, which majority-share gives.
    skewed = torch.cat([images[labels == 0], images[labels == 0], images[labels != 0][:20]])
    main = skewed[:1].expand_as(skewed).clone()
    one_figure = emulator_fidelity(_toy_teacher, skewed, main)
    assert one_figure["consistency"] == one_figure["majority-share"] == pytest.approx(20 / 40)
    # Separation: the mean L1 per pixel (images in [-1, 1]) between two class means.
    two = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 255.0)]).to(torch.uint8)
    assert class_separation(two, torch.tensor([0, 1])) == pytest.approx(2.0)
    assert class_separation(two, torch.tensor([0, 0])) is None
    shifted = (images.int() + 51).clamp(max=255).to(torch.uint8)
    expected = (shifted.float() - images.float()).div(127.5).abs().mean().item()
    assert emulator_fidelity(_toy_teacher, images, images, shifted)["student-distance"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="uint8"):
        emulator_fidelity(_toy_teacher, images.float(), images)
