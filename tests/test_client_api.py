"""The public client API: `mekd_fl.client.edge` (no Flower) and `register_mekd` on a user's own ClientApp.

The user's app here is written as a Flower user would: its own model with its own state-dict keys,
its own data (a DataLoader of floats in [0, 1]), its own `@app.train()` and `@app.evaluate()`. MEKD's
strategy drives it in process (no Ray): the user's train handler must never run, their evaluate
handler must measure MEKD's student, and the student must come to agree with the blind teacher.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mekd_fl.client.edge import EdgeClient, EdgeSettings, as_uint8_images
from mekd_fl.client.handlers import register_mekd
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD
from strategies import protocol as P

pytestmark = pytest.mark.usefixtures("task_identity")

torch.set_num_threads(1)
SHAPE = (1, 8, 8)
CLASSES = 3


class UserNet(nn.Module):
    """A user's model: its own layer names, normalisation inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv1((x - 0.5) / 0.5)).flatten(1))


class Teacher(nn.Module):
    """The blind teacher: a fixed function of the image that a small student can learn."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter(torch.randn(64, CLASSES, generator=g) * 0.6, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1) - 0.5) * 8) @ self.w


def node_images(seed: int, n: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g)  # floats in [0, 1], as ToTensor gives


def agreement(state: dict, images: torch.Tensor) -> float:
    net = UserNet()
    net.load_state_dict(state)
    with torch.no_grad():
        return (net(images).argmax(1) == Teacher()(images).argmax(1)).float().mean().item()


# ---------------------------------------------------------------------------- images in
class PairDataset(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], 0


class DictDataset(PairDataset):
    def __getitem__(self, i: int):
        return {"img": self.images[i], "label": 1}


def test_images_are_read_from_tensors_arrays_datasets_and_loaders_alike() -> None:
    floats = node_images(0, 10)
    expected = floats.mul(255).round().to(torch.uint8)
    sources = [
        floats,
        expected,
        expected.numpy(),
        expected.numpy()[:, 0][:, None],
        PairDataset(floats),
        DictDataset(expected),
        DataLoader(TensorDataset(floats, torch.zeros(10)), batch_size=3),
        DataLoader(DictDataset(floats), batch_size=4),
    ]
    for source in sources:
        out = as_uint8_images(source)
        assert out.dtype == torch.uint8 and out.shape == (10, *SHAPE), type(source)
        assert torch.equal(out, expected), type(source)


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.randn(4, 1, 8, 8), "[0, 1]"),  # normalised floats
        (torch.full((2, 1, 8, 8), float("nan")), "[0, 1]"),
        (torch.zeros(2, 1, 1, 8, 8), "(N, C, H, W)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.complex64), "not accepted"),
        ([], "no image"),
        (DataLoader(DictDataset(torch.rand(4, 1, 8, 8)), batch_size=2), None),  # fine, as a control
    ],
)
def test_bad_images_are_refused_with_one_line(bad, words) -> None:
    if words is None:
        as_uint8_images(bad)
        return
    with pytest.raises(ValueError) as err:
        as_uint8_images(bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_dict_samples_without_a_known_image_key_name_the_setting() -> None:
    class Odd(PairDataset):
        def __getitem__(self, i):
            return {"pixels": self.images[i]}

    with pytest.raises(ValueError, match="image_key"):
        as_uint8_images(Odd(torch.rand(2, *SHAPE)))
    assert as_uint8_images(Odd(torch.rand(2, *SHAPE)), image_key="pixels").shape == (2, *SHAPE)


# ---------------------------------------------------------------------------- settings
def test_edge_settings_are_the_client_settings_an_edge_device_uses() -> None:
    """Derived from the schema: what a client is sent, less what only the Flower client reads to build its
    data and model; with the same defaults as a RunConfig's."""
    run = RunConfig()
    names = set(EdgeSettings().to_dict())
    assert names == set(run.client_dict()) - {"dataset", "student-arch", "run-name", "emulator-fid"}
    assert EdgeSettings().to_dict() == {k: v for k, v in run.client_dict().items() if k in names}


def test_edge_settings_read_a_flower_config_and_check_it() -> None:
    s = EdgeSettings.from_config({"lr": 0.2, "local-epochs": 3, "proximal-mu": 0.1, "server-round": 4})
    assert (s.lr, s.local_epochs) == (0.2, 3)  # kebab-case keys; a strategy's own keys are ignored
    with pytest.raises(ConfigError, match="method"):
        EdgeSettings.from_config({"method": "nope"})
    with pytest.raises(ConfigError, match="lr"):
        EdgeSettings.from_config({"lr": True})


# ---------------------------------------------------------------------------- the core, without Flower
def test_edge_client_distills_a_users_model_without_flower() -> None:
    images = node_images(1, 128)
    settings = EdgeSettings(method="kd", local_epochs=3, lr=0.1, batch_size=32, num_rounds=1)
    edge = EdgeClient(images, UserNet, settings=settings)
    assert edge.num_classes == CLASSES  # inferred from the model's output
    torch.manual_seed(0)
    start = UserNet().state_dict()
    queries = edge.query_images(budget=100)
    assert queries.dtype == torch.uint8 and len(queries) == 100
    oracle = TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE)
    answers = oracle.query("me", queries)
    state, metrics, _ = edge.distill(start, queries, answers)
    assert set(state) == set(start) and metrics["steps"] > 0
    held = node_images(99, 256)
    assert agreement(state, held) > agreement(start, held) + 0.1
    with pytest.raises(ValueError, match="does not fit"):
        edge.distill({"1.stem.0.weight": torch.zeros(1)}, queries, answers)


def test_preprocess_hooks_feed_the_models_their_own_input() -> None:
    seen = []

    class Probe(UserNet):
        def forward(self, x):
            seen.append((float(x.min()), float(x.max())))
            return super().forward(x * 0 + 0.5)

    edge = EdgeClient(node_images(2, 8), Probe, preprocess=lambda x: x * 2 - 1, num_classes=CLASSES)
    edge.predict(Probe().state_dict(), as_uint8_images(node_images(3, 8)))
    assert min(lo for lo, _ in seen) < -0.5 and max(hi for _, hi in seen) <= 1.0
    teacher_inputs = []

    class TeacherProbe(Teacher):
        def forward(self, x):
            teacher_inputs.append(float(x.min()))
            return super().forward(x)

    oracle = TeacherOracle(TeacherProbe(), num_classes=CLASSES, image_shape=SHAPE, preprocess=lambda x: x - 10)
    oracle.query("me", torch.zeros(2, *SHAPE, dtype=torch.uint8))
    assert teacher_inputs == [-10.0]


# ---------------------------------------------------------------------------- a user's Flower app
class InProcessGrid:
    """Runs each message through a real ClientApp in this process, one Context per node."""

    def __init__(self, app: ClientApp, nodes: int) -> None:
        self.app = app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                state=RecordDict(),
                run_config={},
                node_config={"partition-id": i, "num-partitions": nodes},
            )
            for i in range(nodes)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            try:
                out.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001  (Flower turns a handler's exception into an error reply)
                out.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m))
        return out


def users_app(calls: dict[str, int]) -> ClientApp:
    """A user's quickstart-style ClientApp: own train (supervised) and evaluate handlers."""
    app = ClientApp()

    def loader(context: Context) -> DataLoader:
        images = node_images(10 + int(context.node_config["partition-id"]))
        return DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=16)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls["train"] += 1
        raise AssertionError("MEKD must never call the user's supervised train handler")

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        calls["evaluate"] += 1
        held = node_images(50 + int(context.node_config["partition-id"]), 64)
        acc = agreement(msg.content["arrays"].to_torch_state_dict(), held)
        return Message(RecordDict({"metrics": MetricRecord({"eval_acc": acc, "num-examples": 64})}), reply_to=msg)

    register_mekd(
        app,
        data=loader,
        model=UserNet,
        settings=EdgeSettings(emulator_width=4, emulator_batch_size=16, local_epochs=3, batch_size=16),
    )
    return app


@pytest.mark.parametrize("oracle_kind", ["teacher-oracle", "numpy-callable"])
def test_mekd_drives_a_users_own_flower_app(oracle_kind: str) -> None:
    calls = {"train": 0, "evaluate": 0}
    grid = InProcessGrid(users_app(calls), nodes=3)
    teacher = Teacher()
    if oracle_kind == "teacher-oracle":
        oracle = TeacherOracle(teacher, num_classes=CLASSES, image_shape=SHAPE)
    else:  # what a JSON endpoint gives: numpy probabilities

        def oracle(client: str, images: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return teacher(images.float() / 255).softmax(1).numpy().astype(np.float64)

    torch.manual_seed(0)
    start = UserNet().state_dict()
    strategy = MEKD(
        oracle,
        strategy=FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2),
        emulator_steps=4,
        log_fn=lambda _: None,
    )
    result = strategy.start(grid, ArrayRecord(start), num_rounds=3, train_config=ConfigRecord({"lr": 0.05}))
    assert strategy.failures.entries == [], strategy.failures.entries
    assert calls == {"train": 0, "evaluate": 9}
    assert result.evaluate_metrics_clientapp[3]["eval_acc"] > 0
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count(P.EMULATOR) == 3 and types.count(P.TRAIN) == 9
    assert all(m.content[P.CONFIG][P.PHASE_STEPS] == 4 for m in grid.sent if m.metadata.message_type == P.EMULATOR)
    final = result.arrays.to_torch_state_dict()
    held = node_images(98, 256)
    assert set(final) == set(start)
    assert agreement(final, held) > agreement(start, held) + 0.1
    assert agreement(final, held) > 0.6  # chance is 1/3
