"""The client honours the contract of the strategy it serves, and tells a user what is wrong.

FedProx's proximal term enters MEKD's distillation exactly as Flower's FedProx documents it for its
clients; Flower's client-side DP mods, which would act on every MEKD message, are refused in one line; a
student that returns probabilities is refused at its first batch; image batches are taken only in the
documented (N, C, H, W) layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from torch import nn
from torch.utils.data import DataLoader

from mekd_fl.augment import to_unit
from mekd_fl.client.edge import EdgeClient, EdgeSettings, as_uint8_images, check_logits
from mekd_fl.client.handlers import mekd_handlers, register_handlers, register_mekd
from mekd_fl.distill import DistillContext, get_distiller
from strategies import protocol as P

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("task_identity")
SHAPE, CLASSES = (1, 4, 4), 3


def net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES))


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    answers = torch.softmax(torch.randn(n, CLASSES, generator=g) * 2, 1)
    return images, answers


SETTINGS = EdgeSettings(method="kd", local_epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0)


def by_hand(mu: float) -> dict[str, torch.Tensor]:
    """Two SGD steps of KD plus Flower's documented proximal term, written out as FedProx's docs say."""
    images, answers = data()
    student = net()
    global_params = [p.detach().clone() for p in student.parameters()]  # after loading, before training
    kd = get_distiller("kd", DistillContext.from_config(SETTINGS, CLASSES))
    opt = torch.optim.SGD(student.parameters(), lr=SETTINGS.round_lr(1))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SETTINGS.seed * 7919 + 0 * 31 + 1))
    for start in range(0, len(images), SETTINGS.batch_size):
        idx = order[start : start + SETTINGS.batch_size]
        x = to_unit(images[idx])
        loss = kd.losses(student(x), answers[idx], x, 1.0)["loss"]
        proximal_term = 0.0
        for local_weights, global_weights in zip(student.parameters(), global_params):
            proximal_term += (local_weights - global_weights).norm(2)
        loss = loss + (mu / 2) * proximal_term
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.state_dict()


def edge_update(mu: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    images, answers = data()
    edge = EdgeClient(images, net, settings=SETTINGS, num_classes=CLASSES)
    state, metrics, _ = edge.distill(net().state_dict(), images, answers, server_round=1, proximal_mu=mu)
    return state, metrics


def test_the_proximal_term_is_flowers_fedprox_term() -> None:
    plain, plain_metrics = edge_update(0.0)
    prox, prox_metrics = edge_update(0.5)
    for key, expected in by_hand(0.5).items():
        torch.testing.assert_close(prox[key], expected, rtol=1e-5, atol=1e-6)
    for key, expected in by_hand(0.0).items():
        torch.testing.assert_close(plain[key], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(prox[k], plain[k]) for k in prox)  # mu > 0 differs from mu = 0
    moved = lambda s: sum(float((s[k] - net().state_dict()[k]).norm()) for k in s)  # noqa: E731
    assert moved(prox) < moved(plain)  # and pulls the update towards the global model
    assert prox_metrics["train-proximal"] > 0 and "train-proximal" not in plain_metrics


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_a_bad_proximal_mu_is_refused_in_one_line(mu: float) -> None:
    with pytest.raises(ValueError) as err:
        edge_update(mu)
    assert "proximal-mu" in str(err.value) and "accepted" in str(err.value) and "\n" not in str(err.value)


def test_the_distill_handler_reads_fedprox_s_key() -> None:
    images, answers = data()
    app = register_mekd(ClientApp(), data=images, model=net, settings=SETTINGS, num_classes=CLASSES)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    context.state["teacher-answers"] = ArrayRecord(
        {P.IMAGES: Array(images.numpy()), P.RESPONSES: Array(answers.numpy())}
    )

    def distill(mu: float | None) -> dict[str, np.ndarray]:
        config = {P.SERVER_ROUND: 1, **({P.PROXIMAL_MU: mu} if mu is not None else {})}
        records = {P.ARRAYS: ArrayRecord(net().state_dict()), P.CONFIG: ConfigRecord(config)}
        message = Message(RecordDict(records), dst_node_id=7, message_type=P.TRAIN)
        out = app(message, context)
        assert not out.has_error(), out.error
        return {k: v.numpy() for k, v in out.content[P.ARRAYS].items()}

    with_mu, without = distill(0.5), distill(None)
    expected = by_hand(0.5)
    for key in expected:
        np.testing.assert_allclose(with_mu[key], expected[key].numpy(), rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(with_mu[k], without[k]) for k in with_mu)


DP_MODS = [
    fixedclipping_mod,
    adaptiveclipping_mod,
    LocalDpMod(clipping_norm=1.0, sensitivity=1.0, epsilon=1.0, delta=0.1),
]


@pytest.mark.parametrize("mod", DP_MODS, ids=["fixedclipping_mod", "adaptiveclipping_mod", "LocalDpMod"])
def test_flowers_client_side_dp_mods_are_refused_in_one_line(mod) -> None:
    """Flower's DP mods check no message type: as app-level mods they would wrap MEKD's query and emulator
    handlers too, so they are refused, whether MEKD's handlers come through register_mekd or by hand."""
    images, _ = data()
    name = getattr(mod, "__name__", type(mod).__name__)
    with pytest.raises(ValueError) as err:
        register_mekd(ClientApp(mods=[mod]), data=images, model=net, num_classes=CLASSES)
    text = str(err.value)
    assert name in text and "accepted" in text and "\n" not in text
    with pytest.raises(ValueError, match=name):
        register_handlers(ClientApp(mods=[mod]), mekd_handlers(lambda message, context: None))  # type: ignore[arg-type]
    register_mekd(ClientApp(), data=images, model=net, num_classes=CLASSES)  # without the mod: accepted


def test_a_student_that_returns_probabilities_is_refused_at_its_first_batch() -> None:
    images, answers = data()

    def softmax_net() -> nn.Module:
        return nn.Sequential(net(), nn.Softmax(dim=1))

    with pytest.raises(ValueError, match="returns probabilities.*logits"):
        EdgeClient(images, softmax_net, settings=SETTINGS)  # the model's width is inferred: caught there
    edge = EdgeClient(images, softmax_net, settings=SETTINGS, num_classes=CLASSES)  # no forward yet
    with pytest.raises(ValueError, match="returns probabilities") as err:
        edge.distill(softmax_net().state_dict(), images, answers)
    assert "\n" not in str(err.value)
    log_softmax = EdgeClient(images, lambda: nn.Sequential(net(), nn.LogSoftmax(dim=1)), settings=SETTINGS)
    log_softmax.distill(log_softmax.new_student().state_dict(), images, answers)  # log-probabilities are logits


def test_image_batches_are_taken_only_as_documented() -> None:
    batch = torch.randint(0, 256, (5, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError) as err:
        as_uint8_images(batch)  # (N, H, W): ambiguous with one (C, H, W) image; refused
    assert "(N, C, H, W)" in str(err.value) and "images[:, None]" in str(err.value) and "\n" not in str(err.value)
    assert as_uint8_images(batch[:, None]).shape == (5, 1, 8, 8)

    class Samples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> torch.Tensor:
            return batch[i]  # one (H, W) sample: documented for single images

    assert torch.equal(as_uint8_images(Samples()), batch[:, None])


def test_a_softmax_student_is_refused_at_its_first_forward_even_when_it_only_scores_queries() -> None:
    """With num_classes given, uncertainty-scored queries can run the student before any distillation."""
    images, _ = data()
    softmax_net = lambda: nn.Sequential(net(), nn.Softmax(dim=1))  # noqa: E731
    settings = EdgeSettings(method="kd", batch_size=4, query_selection="uncertainty", query_fraction=0.5)
    edge = EdgeClient(images, softmax_net, settings=settings, num_classes=CLASSES)
    with pytest.raises(ValueError, match="returns probabilities.*logits"):
        edge.query_images(8, student_state=softmax_net().state_dict())
    logits = EdgeClient(images, net, settings=settings, num_classes=CLASSES)
    assert len(logits.query_images(8, student_state=net().state_dict())) == 4


def test_the_logits_check_catches_bf16_probabilities_and_passes_non_negative_logits() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 10, generator=g) * 3
    with pytest.raises(ValueError, match="returns probabilities"):
        check_logits(scores.bfloat16().softmax(1))  # sums to 1 only within ~2e-3 in bf16
    check_logits(scores.relu())  # a ReLU-ended head: non-negative, but its rows do not sum to 1
    check_logits(scores.log_softmax(1))  # log-probabilities are logits
    check_logits(torch.ones(4, 1))  # one output: nothing to tell


@pytest.mark.parametrize("as_array", [False, True])
def test_a_batch_without_its_channel_axis_is_refused_from_tensors_arrays_and_loaders(as_array: bool) -> None:
    batch = torch.randint(0, 256, (6, 8, 8), dtype=torch.uint8)
    for source in (batch.numpy() if as_array else batch, DataLoader(batch.float() / 255, batch_size=3)):
        with pytest.raises(ValueError) as err:
            as_uint8_images(source)
        assert "(N, C, H, W)" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            EdgeClient(source, net, settings=SETTINGS, num_classes=CLASSES)
    assert as_uint8_images(batch.numpy()[:, None]).shape == (6, 1, 8, 8)
