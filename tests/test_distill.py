"""Distillation losses against hand computations, MEKD's frozen generator, and the method registry."""

import math

import pytest
import torch
from torch import nn

from mekd_fl.distill import (
    DistillContext,
    get_class,
    get_distiller,
    kl_divergence,
    methods,
    needs_generator,
    teacher_log_probs,
)
from mekd_fl.distill.kd import KD
from mekd_fl.distill.mekd import MEKD, FrozenGenerator, frozen_generator
from mekd_fl.errors import ConfigError
from mekd_fl.models.gan import Generator

torch.set_num_threads(1)

C = 3
TEACHER = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
STUDENT = torch.tensor([[1.0, 1.0, 0.0], [-0.5, 2.0, 0.5]])
IMAGES = torch.zeros(2, 1, 4, 4)  # unused by the losses, but part of the interface


# ---------------------------------------------------------------------------- hand computations
def softmax_rows(x: torch.Tensor, t: float = 1.0) -> list[list[float]]:
    out = []
    for row in x.tolist():
        e = [math.exp(v / t) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def hand_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> float:
    """mean_b sum_c p_T (log p_T - log p_S) * T^2 with p = softmax(logits / T)."""
    pts, pss = softmax_rows(teacher_logits, t), softmax_rows(student_logits, t)
    per_row = [sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)) for pt, ps in zip(pts, pss)]
    return sum(per_row) / len(per_row) * t * t


# ---------------------------------------------------------------------------- KL
def test_kl_closed_form_two_classes() -> None:
    # p_T = (1/4, 3/4), p_S = (1/2, 1/2) at T = 1.
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_divergence(t, s, 1.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_equals_hand_computation(temperature: float) -> None:
    got = kl_divergence(TEACHER, STUDENT, temperature).item()
    assert got == pytest.approx(hand_kl(TEACHER, STUDENT, temperature), rel=1e-5)
    assert got > 0


def test_kl_temperature_matters() -> None:
    # Guard against a loss that ignores T: the two values differ for these inputs.
    assert kl_divergence(TEACHER, STUDENT, 1.0).item() != pytest.approx(kl_divergence(TEACHER, STUDENT, 4.0).item())


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_zero_when_student_matches_teacher(temperature: float) -> None:
    assert kl_divergence(TEACHER, TEACHER.clone(), temperature).item() == pytest.approx(0.0, abs=1e-6)
    # A per-row shift of the student's logits changes nothing either.
    assert kl_divergence(TEACHER, TEACHER + torch.tensor([[5.0], [-2.0]]), temperature).item() == pytest.approx(
        0.0, abs=1e-5
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_teacher_log_probs_from_probs_and_logits_agree(temperature: float) -> None:
    probs = TEACHER.softmax(1)
    from_probs = teacher_log_probs(probs, "probs")
    from_logits = teacher_log_probs(TEACHER, "logits")
    torch.testing.assert_close(from_probs.exp(), probs)
    torch.testing.assert_close(from_logits.exp(), probs)
    expected = torch.tensor(softmax_rows(TEACHER, temperature))
    torch.testing.assert_close((from_probs / temperature).softmax(1), expected)
    torch.testing.assert_close((from_logits / temperature).softmax(1), expected)
    # And so the KL is the same whichever form the oracle answers.
    assert kl_divergence(from_probs, STUDENT, temperature).item() == pytest.approx(
        kl_divergence(from_logits, STUDENT, temperature).item(), rel=1e-5
    )


# ---------------------------------------------------------------------------- KD
@pytest.mark.parametrize("oracle_output", ["probs", "logits"])
def test_kd_loss_is_the_kl(oracle_output: str) -> None:
    ctx = DistillContext(num_classes=C, temperature=4.0, oracle_output=oracle_output)
    kd = get_distiller("kd", ctx)
    assert isinstance(kd, KD)
    response = TEACHER.softmax(1) if oracle_output == "probs" else TEACHER
    parts = kd.losses(STUDENT, response, IMAGES, 0)
    assert parts["loss"].item() == pytest.approx(hand_kl(TEACHER, STUDENT, 4.0), rel=1e-5)
    assert parts["kl"].item() == parts["loss"].item()


# ---------------------------------------------------------------------------- MEKD
class LinearGen(nn.Module):
    """A tiny deterministic 'generator': C scores -> a (B, 1, 4, 4) image, optionally through BatchNorm."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(C, 16)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-1.0, 1.0, 16 * C).view(16, C) ** 3 + 0.1)
            self.fc.bias.copy_(torch.linspace(0.2, -0.3, 16))
        self.bn = nn.BatchNorm1d(16) if batchnorm else None
        if self.bn is not None:
            with torch.no_grad():
                self.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
                self.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
                self.bn.weight.copy_(torch.linspace(0.5, 1.5, 16))
                self.bn.bias.copy_(torch.linspace(0.1, -0.1, 16))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z)
        if self.bn is not None:
            h = self.bn(h)
        return h.view(-1, 1, 4, 4)


def hand_gen(gen: LinearGen, z: torch.Tensor) -> torch.Tensor:
    """G written out: z W^T + b, then (eval-mode) BatchNorm with the running statistics."""
    h = z @ gen.fc.weight.detach().T + gen.fc.bias.detach()
    if gen.bn is not None:
        bn = gen.bn
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight.detach() + bn.bias.detach()
    return h.view(-1, 1, 4, 4)


def log_softmax_rows(x: torch.Tensor) -> torch.Tensor:
    return x - torch.logsumexp(x, dim=1, keepdim=True)


def hand_inputs(oracle_output: str, emulator_input: str, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What G receives for the teacher and for the student."""
    if oracle_output == "logits":  # raw logits of both
        t_scores, s_scores = TEACHER, STUDENT
    else:  # log-probabilities of both
        t_scores, s_scores = log_softmax_rows(TEACHER), log_softmax_rows(STUDENT)
    if emulator_input == "probs":  # softmax at T = 1
        return torch.tensor(softmax_rows(t_scores)), torch.tensor(softmax_rows(s_scores))
    return t_scores / t, s_scores / t


def make_mekd(gen: nn.Module, **kw) -> MEKD:
    ctx = DistillContext(num_classes=C, generator=gen, **kw)
    distiller = get_distiller("mekd", ctx)
    assert isinstance(distiller, MEKD)
    return distiller


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("oracle_output", ["probs", "logits"])
@pytest.mark.parametrize("emulator_input", ["probs", "logits"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_mekd_emulation_equals_hand_computation(
    distance: str, emulator_input: str, oracle_output: str, batchnorm: bool
) -> None:
    t = 4.0
    gen = LinearGen(batchnorm)
    mekd = make_mekd(gen, temperature=t, oracle_output=oracle_output, distance=distance, emulator_input=emulator_input)
    response = TEACHER.softmax(1) if oracle_output == "probs" else TEACHER
    parts = mekd.losses(STUDENT, response, IMAGES, 0)

    in_t, in_s = hand_inputs(oracle_output, emulator_input, t)
    diff = hand_gen(gen, in_s) - hand_gen(gen, in_t)
    expected = diff.abs().mean() if distance == "l1" else (diff**2).mean()
    assert parts["emulation"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["emulation"].item() > 0
    assert parts["kl"].item() == pytest.approx(hand_kl(TEACHER, STUDENT, t), rel=1e-5)


def test_mekd_emulation_zero_when_student_matches_teacher() -> None:
    mekd = make_mekd(LinearGen(), oracle_output="logits", emulator_input="logits")
    parts = mekd.losses(TEACHER.clone(), TEACHER, IMAGES, 0)
    assert parts["emulation"].item() == pytest.approx(0.0, abs=1e-7)
    assert parts["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_mekd_loss_is_weighted_sum() -> None:
    mekd = make_mekd(LinearGen(), temperature=4.0, weight_emulation=0.3, weight_kl=2.0)
    parts = mekd.losses(STUDENT, TEACHER.softmax(1), IMAGES, 0)
    assert set(parts) == {"loss", "emulation", "kl"}
    expected = 0.3 * parts["emulation"].item() + 2.0 * parts["kl"].item()
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-6)
    # Not the unweighted sum (which would equal it only by accident).
    assert parts["loss"].item() != pytest.approx(parts["emulation"].item() + parts["kl"].item())


@pytest.mark.parametrize("epoch", [1.0, 40.0])  # inside DKD's warm-up, and past it
def test_mekd_on_dkd_is_the_emulation_term_plus_dkds_loss(epoch: float) -> None:
    from mekd_fl.distill.dkd import dkd_parts

    kw = {"temperature": 4.0, "weight_emulation": 0.3, "dkd_alpha": 0.5, "dkd_beta": 6.0, "dkd_warmup": 20.0}
    gen = LinearGen()
    ctx = DistillContext(num_classes=C, generator=gen, **kw)
    parts = get_distiller("mekd-dkd", ctx).losses(STUDENT, TEACHER.softmax(1), IMAGES, epoch)
    plain = make_mekd(gen, **kw).losses(STUDENT, TEACHER.softmax(1), IMAGES, epoch)
    tckd, nckd = dkd_parts(log_softmax_rows(TEACHER), STUDENT, 4.0)
    dkd = min(epoch / 20.0, 1.0) * (0.5 * tckd.item() + 6.0 * nckd.item())
    assert parts["emulation"].item() == pytest.approx(plain["emulation"].item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.3 * plain["emulation"].item() + dkd, rel=1e-5)
    assert {"tckd", "nckd"} <= set(parts) and "kl" not in parts
    assert needs_generator("mekd-dkd") is True


@pytest.mark.parametrize(("method", "own"), [("mekd", 1.0), ("mekd-dkd", 10.0)])
def test_emulation_weight_left_at_minus_one_is_the_methods_own(method: str, own: float) -> None:
    # weight-emulation's default (-1) gives mekd the paper's 1 and mekd-dkd 10; a weight the run gives wins.
    kw = {"temperature": 4.0, "weight_kl": 2.0, "dkd_warmup": 1.0}
    gen = LinearGen()
    by_default = get_distiller(method, DistillContext(num_classes=C, generator=gen, **kw))
    given = get_distiller(method, DistillContext(num_classes=C, generator=gen, weight_emulation=0.5, **kw))
    parts = by_default.losses(STUDENT, TEACHER.softmax(1), IMAGES, 5.0)
    other = parts["loss"] - own * parts["emulation"]  # the term beside the emulation term (KD's or DKD's)
    assert parts["emulation"].item() > 0
    assert (by_default.emulation_weight, given.emulation_weight) == (own, 0.5)
    again = given.losses(STUDENT, TEACHER.softmax(1), IMAGES, 5.0)
    assert again["loss"].item() == pytest.approx(0.5 * again["emulation"].item() + other.item(), rel=1e-5)


def test_a_run_is_compared_on_the_settings_its_method_runs_with() -> None:
    # another method's settings are left out (KD never reads weight-emulation), MEKD on DKD keeps DKD's,
    # and -1 is resolved to the method's own weight, so a bench sees "1.0 then -1" as no change for mekd
    from mekd_fl.config import RunConfig
    from mekd_fl.distill import get_class

    run = RunConfig().to_dict()
    kd = get_class("kd").runs_with(run)
    assert "weight-emulation" not in kd and "dkd-alpha" not in kd and kd["temperature"] == run["temperature"]
    on_dkd = get_class("mekd-dkd").runs_with(run)
    assert (on_dkd["weight-emulation"], on_dkd["dkd-alpha"]) == (10.0, run["dkd-alpha"])
    assert get_class("mekd").runs_with(run)["weight-emulation"] == 1.0
    assert "dkd-alpha" not in get_class("mekd").runs_with(run)
    assert get_class("mekd").runs_with({**run, "weight-emulation": 0.5})["weight-emulation"] == 0.5


class ReadRecorder(DistillContext):
    """A DistillContext that records which settings a method's loss reads."""

    __slots__ = ()
    read: set[str] = set()

    def __getattr__(self, name: str):  # noqa: ANN204 - the settings' types vary
        by_attr = {s.attr: s.name for s in self.declared()}
        if name in by_attr:
            ReadRecorder.read.add(by_attr[name])
        return super().__getattr__(name)


@pytest.mark.parametrize("method", methods())
def test_a_methods_loss_reads_no_setting_that_runs_with_leaves_out(method: str) -> None:
    # what `runs_with` drops, a bench ignores when it compares a finished cell with its spec: a method
    # that read another method's setting without declaring it (reads_settings_of) would resume wrongly
    ReadRecorder.read = set()
    ctx = ReadRecorder(num_classes=C, generator=LinearGen() if needs_generator(method) else None, dkd_warmup=1.0)
    distiller = get_distiller(method, ctx)
    distiller.prepare(TEACHER.softmax(1))
    labels = torch.tensor([0, 2]) if get_class(method).uses_labels else None
    distiller.losses(STUDENT.clone().requires_grad_(), TEACHER.softmax(1), IMAGES, 5.0, labels=labels)
    kept = get_class(method).runs_with({s.name: 0.0 for s in DistillContext.declared()})
    assert ReadRecorder.read <= set(kept), sorted(ReadRecorder.read - set(kept))


@pytest.mark.parametrize("weight", [-0.5, -2.0])
def test_negative_emulation_weight_other_than_minus_one_is_refused(weight: float) -> None:
    from mekd_fl.config import RunConfig

    with pytest.raises(ConfigError, match=r"^weight-emulation=-[0-9.]+ must be >= 0, or -1 \(the method's own"):
        RunConfig(weight_emulation=weight).validate()
    for accepted in (-1.0, 0.0, 10.0):
        RunConfig(weight_emulation=accepted).validate()


def test_gradient_flows_to_student_not_to_generator() -> None:
    gen = LinearGen(batchnorm=True)
    gen.train()  # the distiller must freeze it whatever mode it came in
    mekd = make_mekd(gen, weight_emulation=0.3, weight_kl=2.0)
    assert not gen.training and not gen.bn.training
    assert all(not p.requires_grad for p in gen.parameters())

    torch.manual_seed(0)
    student = nn.Linear(4, C)
    x = torch.randn(2, 4)
    parts = mekd.losses(student(x), TEACHER.softmax(1), IMAGES, 0)
    parts["loss"].backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert student.bias.grad is not None and student.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.parameters())


def test_emulation_term_alone_pulls_the_student_through_g() -> None:
    # The image distance must be differentiable w.r.t. the student's logits *through* G (the method's point),
    # and its gradient must equal that of the hand-written loss.
    gen = LinearGen(batchnorm=True)
    mekd = make_mekd(gen, distance="l2", emulator_input="probs", oracle_output="logits")
    logits = STUDENT.clone().requires_grad_(True)
    mekd.losses(logits, TEACHER, IMAGES, 0)["emulation"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0

    ref = STUDENT.clone().requires_grad_(True)
    manual = ((hand_gen(gen, ref.softmax(1)) - hand_gen(gen, TEACHER.softmax(1))) ** 2).mean()
    manual.backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_generator_batchnorm_statistics_unchanged() -> None:
    gen = LinearGen(batchnorm=True)
    gen.train()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    mekd = make_mekd(gen)
    for step in range(3):
        logits = STUDENT.clone().requires_grad_(True)
        mekd.losses(logits, TEACHER.softmax(1), IMAGES, step)["loss"].backward()
    after = gen.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"generator {key} changed"
    assert int(after["bn.num_batches_tracked"]) == 0


# ---------------------------------------------------------------------------- MEKD's speed-ups (issue 9)
def emulator_g(shape: tuple[int, int, int] = (1, 8, 8), width: int = 4, classes: int = C, seed: int = 0) -> Generator:
    """The real emulator Generator with non-trivial BatchNorm statistics (so folding them is tested)."""
    torch.manual_seed(seed)
    gen = Generator(classes, shape, width)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return gen.eval()


@pytest.mark.parametrize(("shape", "width"), [((1, 8, 8), 4), ((1, 28, 28), 16), ((3, 32, 32), 8)])
def test_frozen_generator_is_the_generator_to_float_rounding(shape: tuple[int, int, int], width: int) -> None:
    gen = emulator_g(shape, width, classes=10)
    fast = FrozenGenerator(gen)
    z = torch.randn(16, 10)
    target = torch.rand(16, *shape) * 2 - 1
    z_ref, z_fast = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out_ref, out_fast = gen(z_ref), fast(z_fast)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    (out_ref - target).abs().mean().backward()
    (out_fast - target).abs().mean().backward()
    torch.testing.assert_close(z_fast.grad, z_ref.grad, rtol=1e-4, atol=1e-9)
    assert all(not b.requires_grad for b in fast.buffers())
    with pytest.raises(ValueError, match="generator expects input"):
        fast(torch.zeros(2, 9))


def test_frozen_generator_leaves_other_generators_as_they_are() -> None:
    gen = LinearGen(batchnorm=True)
    assert frozen_generator(gen) is gen
    with pytest.raises(ValueError, match="Generator layout only"):
        FrozenGenerator(gen)
    assert isinstance(frozen_generator(emulator_g()), FrozenGenerator)


@pytest.mark.parametrize("oracle_output", ["probs", "logits"])
@pytest.mark.parametrize("emulator_input", ["probs", "logits"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_mekd_cached_target_equals_the_per_step_formula(distance: str, emulator_input: str, oracle_output: str) -> None:
    """prepare(all answers) + losses(index=rows) gives the loss and gradient of G(T(x)) computed per step
    with the original generator, for every combination of settings."""
    t = 4.0
    gen = emulator_g()
    kw = dict(temperature=t, oracle_output=oracle_output, distance=distance, emulator_input=emulator_input)
    mekd = make_mekd(gen, weight_emulation=0.7, weight_kl=1.3, **kw)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1100, C, generator=g) * 3  # more than one chunk of `prepare`
    responses = teacher.softmax(1) if oracle_output == "probs" else teacher
    mekd.prepare(responses)
    idx = torch.tensor([1099, 3, 517, 512, 0, 40])
    student = torch.randn(len(idx), C, generator=g) * 2

    logits = student.clone().requires_grad_(True)
    parts = mekd.losses(logits, responses[idx], IMAGES, 1.0, index=idx)
    parts["loss"].backward()

    ref = student.clone().requires_grad_(True)
    raw = oracle_output == "logits"
    t_scores = teacher[idx] if raw else teacher_log_probs(responses[idx], "probs")
    s_scores = ref if raw else ref.log_softmax(1)
    to_g = (lambda s: s.softmax(1)) if emulator_input == "probs" else (lambda s: s / t)
    diff = gen(to_g(s_scores)) - gen(to_g(t_scores)).detach()
    emulation = diff.abs().mean() if distance == "l1" else (diff**2).mean()
    kl = kl_divergence(teacher_log_probs(responses[idx], oracle_output), ref, t)
    (0.7 * emulation + 1.3 * kl).backward()

    torch.testing.assert_close(parts["emulation"], emulation.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["kl"], kl.detach())
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-4, atol=1e-8)
    # Without index (or before prepare) the step computes the target itself: the same value.
    per_step = mekd.losses(student, responses[idx], IMAGES, 1.0)
    torch.testing.assert_close(per_step["loss"], parts["loss"].detach(), rtol=1e-6, atol=1e-7)


def test_mekd_prepare_on_no_answers_falls_back_to_per_step() -> None:
    mekd = make_mekd(emulator_g())
    mekd.prepare(torch.empty(0, C))
    assert mekd.losses(STUDENT, TEACHER.softmax(1), IMAGES, 0)["emulation"].item() > 0


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_mekd_training_with_the_cached_target_matches_the_per_step_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's whole MEKD distill call, fixed seed: the cached, rewritten G path trains the same student
    (to float rounding) as computing G(T(x)) every step with the original generator."""
    from mekd_fl.client import edge as edge_module
    from mekd_fl.distill import mekd as mekd_module

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (150, 1, 8, 8), dtype=torch.uint8, generator=g)
    answers = (torch.randn(150, C, generator=g) * 2).softmax(1)
    settings = edge_module.EdgeSettings(method="mekd", local_epochs=2, lr=0.05, batch_size=32, emulator_width=4)
    edge = edge_module.EdgeClient(images, TinyNet, settings=settings, num_classes=C, device="cpu")
    torch.manual_seed(0)
    start = TinyNet().state_dict()
    g_state = emulator_g(width=4).state_dict()

    prepared: list[int] = []
    real_prepare = MEKD.prepare
    monkeypatch.setattr(MEKD, "prepare", lambda self, r: prepared.append(len(r)) or real_prepare(self, r))
    cached, metrics, _ = edge.distill(start, images, answers, g_state)
    assert prepared == [150] and metrics["steps"] == 10

    monkeypatch.setattr(MEKD, "batch_index", False)  # no index: G(T(x)) computed every step ...
    monkeypatch.setattr(mekd_module, "frozen_generator", lambda gen: gen)  # ... by the original generator
    per_step, ref_metrics, _ = edge.distill(start, images, answers, g_state)
    for key, value in per_step.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert metrics["train-loss"] == pytest.approx(ref_metrics["train-loss"], rel=1e-5)
    assert any(not torch.equal(start[k], v) for k, v in cached.items())  # it did train


# ---------------------------------------------------------------------------- registry
def test_methods_lists_kd_and_mekd() -> None:
    names = methods()
    assert "kd" in names and "mekd" in names
    assert list(names) == sorted(names)
    assert get_class("kd") is KD and get_class("mekd") is MEKD
    assert needs_generator("mekd") is True
    assert needs_generator("kd") is False


def test_unknown_method_is_a_config_error_listing_methods() -> None:
    with pytest.raises(ConfigError) as info:
        get_distiller("nope", DistillContext(num_classes=C))
    msg = str(info.value)
    assert "method='nope'" in msg
    assert "accepted:" in msg and "kd" in msg and "mekd" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="method='nope'"):
        needs_generator("nope")


def test_mekd_without_generator_refused() -> None:
    with pytest.raises(ValueError, match="method='mekd' needs the client's emulator generator"):
        get_distiller("mekd", DistillContext(num_classes=C))
    # KD does not need one.
    assert isinstance(get_distiller("kd", DistillContext(num_classes=C)), KD)


@pytest.mark.parametrize("spread", [3.0, 10.0, 20.0])
def test_kd_and_dkd_on_float32_probabilities_match_the_logit_formulas(spread: float) -> None:
    """A confident teacher answering float32 probabilities: the losses equal those computed from its
    float64 logits, within 1e-4 (relative); no floor lifts its small probabilities."""
    from mekd_fl.distill.dkd import dkd_parts

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 10, generator=g, dtype=torch.float64) * spread
    student = torch.randn(256, 10, generator=g, dtype=torch.float64) * 2
    probs32 = logits.float().softmax(1)
    assert spread < 10 or probs32.min() < 1e-12  # the regime a fixed 1e-12 floor distorted
    for temperature in (1.0, 4.0):
        got = kl_divergence(teacher_log_probs(probs32, "probs").double(), student, temperature)
        want = kl_divergence(logits.log_softmax(1), student, temperature)
        assert abs(got - want) <= 1e-4 * abs(want), (temperature, float(got), float(want))
        got_t, got_n = dkd_parts(teacher_log_probs(probs32, "probs").double(), student, temperature)
        want_t, want_n = dkd_parts(logits.log_softmax(1), student, temperature)
        assert abs(got_t - want_t) <= 1e-4 * abs(want_t) and abs(got_n - want_n) <= 1e-4 * abs(want_n)


def test_probabilities_that_underflowed_to_zero_stay_finite() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    log_p = teacher_log_probs(probs, "probs")
    assert torch.isfinite(log_p).all() and log_p[0, 1] == math.log(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------- query-free synthesised pairs
def test_synthesised_pairs_are_g_of_answers_drawn_from_the_paid_ones() -> None:
    gen = emulator_g()
    answers = (torch.randn(16, C, generator=torch.Generator().manual_seed(1)) * 2).softmax(1)
    assert make_mekd(gen).synthetic(answers) is None  # weight-synthetic=0: off
    mekd = make_mekd(gen, weight_synthetic=0.5, temperature=4.0)
    torch.manual_seed(0)
    images, targets = mekd.synthetic(answers)
    assert images.shape == (16, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert not torch.allclose(targets, answers)  # drawn between and around them, not the answers themselves
    with torch.no_grad():
        expected = (gen.eval()(targets) + 1) / 2  # G(p') as an image in [0, 1] (emulator-input=probs)
    torch.testing.assert_close(images, expected.clamp(0, 1), rtol=1e-4, atol=1e-5)
    logits = torch.randn(16, C)
    t = 4.0
    pt = torch.softmax(targets.log() / t, dim=1)  # the target at temperature t, against the student's
    hand = (pt * (pt.log() - torch.log_softmax(logits / t, dim=1))).sum(1).mean() * t * t
    assert mekd.synthetic_loss(logits, targets).item() == pytest.approx(0.5 * hand.item(), rel=1e-5)


def test_synthesised_pairs_train_the_student_in_a_clients_distill_call() -> None:
    from mekd_fl.client.edge import EdgeClient, EdgeSettings

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g)
    answers = (torch.randn(64, C, generator=g) * 2).softmax(1)
    torch.manual_seed(0)
    start, g_state = TinyNet().state_dict(), emulator_g(width=4).state_dict()
    trained = {}
    for weight in (0.0, 1.0):
        settings = EdgeSettings(method="mekd", lr=0.05, batch_size=32, emulator_width=4, weight_synthetic=weight)
        edge = EdgeClient(images, TinyNet, settings=settings, num_classes=C, device="cpu")
        state, metrics, _ = edge.distill(start, images, answers, g_state=g_state)
        trained[weight] = (state, metrics)
    assert "train-synthetic" not in trained[0.0][1] and trained[1.0][1]["train-synthetic"] > 0
    assert not torch.allclose(trained[0.0][0]["head.weight"], trained[1.0][0]["head.weight"])


@pytest.mark.parametrize(
    "settings", [{"emulator_pairing": "none"}, {"query_source": "generated"}, {"query_source": "mixed"}]
)
def test_synthesised_pairs_need_a_paired_emulator(settings: dict) -> None:
    from mekd_fl.config import RunConfig

    with pytest.raises(ConfigError, match="weight-synthetic=0.5 needs a paired emulator"):
        RunConfig(weight_synthetic=0.5, **settings).validate()
    RunConfig(weight_synthetic=0.5).validate()  # auto with local queries: paired
