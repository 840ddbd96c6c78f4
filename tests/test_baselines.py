"""Baselines DKD, CDL, CAN and the supervised reference: losses against hand computations, and behaviour."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mekd_fl.distill import DistillContext, get_class, get_distiller, methods, needs_generator
from mekd_fl.distill.can import CAN, make_discriminator
from mekd_fl.distill.cdl import CDL
from mekd_fl.distill.dkd import DKD, dkd_parts
from mekd_fl.distill.supervised import Supervised

torch.set_num_threads(1)

C = 3
TEACHER = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])  # argmax: 0, 2
STUDENT = torch.tensor([[1.0, 1.0, 0.0], [-0.5, 2.0, 0.5]])
IMAGES = torch.zeros(2, 1, 4, 4)  # unused by the losses, but part of the interface


# ============================================================================ DKD
def hand_dkd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> tuple[float, float]:
    """TCKD and NCKD written out row by row: binary [p_t, 1 - p_t], and the renormalised non-target part."""
    tckd, nckd = [], []
    for zt, zs in zip(teacher_logits, student_logits):
        pt, ps = torch.softmax(zt / t, 0), torch.softmax(zs / t, 0)
        target = int(zt.argmax())
        bt = torch.stack([pt[target], 1 - pt[target]])
        bs = torch.stack([ps[target], 1 - ps[target]])
        tckd.append((bt * (bt / bs).log()).sum() * t * t)
        rest = [c for c in range(len(zt)) if c != target]
        ht = pt[rest] / pt[rest].sum()
        hs = ps[rest] / ps[rest].sum()
        nckd.append((ht * (ht / hs).log()).sum() * t * t)
    return torch.stack(tckd).mean().item(), torch.stack(nckd).mean().item()


def make_dkd(**kw) -> DKD:
    distiller = get_distiller("dkd", DistillContext(num_classes=C, **kw))
    assert isinstance(distiller, DKD)
    return distiller


@pytest.mark.parametrize("oracle_output", ["probs", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_parts_equal_hand_computation(oracle_output: str, temperature: float) -> None:
    dkd = make_dkd(temperature=temperature, oracle_output=oracle_output, dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20.0)
    response = TEACHER.softmax(1) if oracle_output == "probs" else TEACHER
    parts = dkd.losses(STUDENT, response, IMAGES, 40.0)
    tckd, nckd = hand_dkd(TEACHER, STUDENT, temperature)
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert tckd > 0 and nckd > 0
    assert parts["warmup"].item() == 1.0
    assert parts["loss"].item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_identity_kd_is_tckd_plus_weighted_nckd(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 10, generator=gen) * 3
    student = torch.randn(16, 10, generator=gen) * 3
    t = temperature
    log_pt, log_ps = F.log_softmax(teacher / t, 1), F.log_softmax(student / t, 1)
    kd = (log_pt.exp() * (log_pt - log_ps)).sum(1) * t * t
    p_target = log_pt.exp().max(1).values
    tckd, nckd = dkd_parts(F.log_softmax(teacher, 1), student, t, reduce=False)
    assert tckd.shape == nckd.shape == (16,)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd, rtol=1e-4, atol=1e-5)
    # Reduced parts are the batch means.
    mean_t, mean_n = dkd_parts(F.log_softmax(teacher, 1), student, t)
    torch.testing.assert_close(mean_t, tckd.mean())
    torch.testing.assert_close(mean_n, nckd.mean())


def test_dkd_zero_when_student_matches_teacher() -> None:
    parts = make_dkd(oracle_output="logits").losses(TEACHER.clone(), TEACHER, IMAGES, 40.0)
    assert parts["tckd"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["nckd"].item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_warmup_is_linear_then_flat() -> None:
    dkd = make_dkd(dkd_warmup=20.0)
    full = dkd.losses(STUDENT, TEACHER.softmax(1), IMAGES, 40.0)
    early = dkd.losses(STUDENT, TEACHER.softmax(1), IMAGES, 5.0)
    assert early["loss"].item() == 0.25 * full["loss"].item()
    assert early["warmup"].item() == 0.25
    assert dkd.losses(STUDENT, TEACHER.softmax(1), IMAGES, 20.0)["loss"].item() == full["loss"].item()
    # The parts themselves are not warmed up.
    assert early["tckd"].item() == full["tckd"].item()
    # dkd_warmup <= 0: no warm-up at all.
    no_warm = make_dkd(dkd_warmup=0.0).losses(STUDENT, TEACHER.softmax(1), IMAGES, 1.0)
    assert no_warm["loss"].item() == full["loss"].item()


def test_dkd_alpha_beta_combine_linearly() -> None:
    def loss(alpha: float, beta: float) -> float:
        return make_dkd(dkd_alpha=alpha, dkd_beta=beta).losses(STUDENT, TEACHER.softmax(1), IMAGES, 40.0)["loss"].item()

    tckd_only, nckd_only = loss(1.0, 0.0), loss(0.0, 1.0)
    assert tckd_only > 0 and nckd_only > 0
    assert loss(2.5, 0.0) == pytest.approx(2.5 * tckd_only, rel=1e-6)
    assert loss(0.0, 3.0) == pytest.approx(3.0 * nckd_only, rel=1e-6)
    assert loss(2.5, 3.0) == pytest.approx(2.5 * tckd_only + 3.0 * nckd_only, rel=1e-6)
    assert loss(2.5, 3.0) != pytest.approx(tckd_only + nckd_only)


# ============================================================================ CDL
# Teacher log-probs for 4 samples over 3 classes; argmax (the pseudo-labels) given per case.
CDL_TEACHER_ALL = torch.tensor([[2.0, 0.0, 0.5], [1.5, 1.0, 0.0], [0.0, 2.5, 1.0], [0.5, 0.0, 1.8]])  # 0,0,1,2
CDL_TEACHER_GAP = torch.tensor([[2.0, 0.0, 0.5], [1.5, 1.0, 0.0], [0.0, 1.0, 2.5], [0.5, 0.0, 1.8]])  # 0,0,2,2
CDL_STUDENT = torch.tensor([[0.5, 0.2, -0.3], [1.0, -1.0, 0.4], [-0.2, 0.8, 0.1], [0.3, 0.3, 0.9]])


def make_cdl(**kw) -> CDL:
    distiller = get_distiller("cdl", DistillContext(num_classes=C, oracle_output="logits", **kw))
    assert isinstance(distiller, CDL)
    return distiller


@pytest.mark.parametrize(
    "teacher, groups", [(CDL_TEACHER_ALL, [[0, 1], [2], [3]]), (CDL_TEACHER_GAP, [[0, 1], [2, 3]])]
)
def test_cdl_parts_equal_hand_computation(teacher: torch.Tensor, groups: list[list[int]]) -> None:
    t, margin = 2.0, 1.0
    parts = make_cdl(temperature=t, cdl_margin=margin, cdl_weight=0.5).losses(CDL_STUDENT, teacher, IMAGES, 1.0)

    q_t = torch.softmax(teacher / t, 1)
    q_s = torch.softmax(CDL_STUDENT / t, 1)
    intra = 0.0
    for rows in groups:  # each sample against its teacher class centre
        centre = q_t[rows].mean(0)
        intra += sum(((q_s[i] - centre) ** 2).sum().item() for i in rows)
    intra /= 4
    centres_s = [q_s[rows].mean(0) for rows in groups]
    pairs = [(j, k) for j in range(len(groups)) for k in range(j + 1, len(groups))]
    inter = sum(max(margin - (centres_s[j] - centres_s[k]).norm().item(), 0.0) ** 2 for j, k in pairs) / len(pairs)

    assert parts["intra"].item() == pytest.approx(intra, rel=1e-5)
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-5)
    assert intra > 0 and inter > 0
    assert parts["loss"].item() == pytest.approx(parts["kl"].item() + 0.5 * (intra + inter), rel=1e-5)


def test_cdl_inter_zero_when_centres_beyond_margin() -> None:
    y = CDL_TEACHER_ALL.argmax(1)
    peaked = 20.0 * F.one_hot(y, C).float()  # student centres ~ one-hot: sqrt(2) apart > 0.5
    parts = make_cdl(temperature=1.0, cdl_margin=0.5).losses(peaked, CDL_TEACHER_ALL, IMAGES, 1.0)
    assert parts["inter"].item() == 0.0
    # ...but a margin beyond sqrt(2) makes it positive for the same outputs.
    assert make_cdl(temperature=1.0, cdl_margin=2.0).losses(peaked, CDL_TEACHER_ALL, IMAGES, 1.0)["inter"].item() > 0


def test_cdl_single_class_batch_has_no_inter_term() -> None:
    teacher = torch.tensor([[2.0, 0.0, 0.5], [1.5, 1.0, 0.0]])
    logits = STUDENT.clone().requires_grad_(True)
    parts = make_cdl().losses(logits, teacher, IMAGES, 1.0)
    assert parts["inter"].item() == 0.0
    parts["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_cdl_intra_zero_at_teacher_class_centres() -> None:
    t = 2.0
    q_t = torch.softmax(CDL_TEACHER_ALL / t, 1)
    centres = torch.stack([q_t[[0, 1]].mean(0), q_t[[0, 1]].mean(0), q_t[2], q_t[3]])
    at_centres = centres.log() * t  # softmax(z / T) == the centres
    cdl = make_cdl(temperature=t)
    assert cdl.losses(at_centres, CDL_TEACHER_ALL, IMAGES, 1.0)["intra"].item() == pytest.approx(0.0, abs=1e-7)
    assert cdl.losses(CDL_STUDENT, CDL_TEACHER_ALL, IMAGES, 1.0)["intra"].item() > 1e-4


# ============================================================================ CAN
def make_can(**kw) -> CAN:
    distiller = get_distiller("can", DistillContext(num_classes=C, **kw))
    assert isinstance(distiller, CAN)
    return distiller


def disc_state(can: CAN) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in can.discriminator.state_dict().items()}


def test_can_student_gets_gradient_discriminator_does_not() -> None:
    can = make_can(can_weight=0.7)
    torch.manual_seed(0)
    student = nn.Linear(4, C)
    parts = can.losses(student(torch.randn(2, 4)), TEACHER.softmax(1), IMAGES, 1.0)
    assert set(parts) == {"loss", "kl", "adv", "d_loss"}
    assert parts["loss"].item() == pytest.approx(parts["kl"].item() + 0.7 * parts["adv"].item(), rel=1e-6)
    before = [None if p.grad is None else p.grad.clone() for p in can.discriminator.parameters()]
    parts["loss"].backward()
    for p, g in zip(can.discriminator.parameters(), before):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0

    # The adversarial term alone reaches the student too.
    logits = STUDENT.clone().requires_grad_(True)
    can.losses(logits, TEACHER.softmax(1), IMAGES, 1.0)["adv"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_can_discriminator_update_changes_its_weights() -> None:
    initial = make_discriminator(C).state_dict()  # the seeded initial D
    can = make_can(can_lr=1e-3)
    assert can.extra_state() is None
    can.losses(STUDENT, TEACHER.softmax(1), IMAGES, 1.0)
    first = can.extra_state()
    assert any(not torch.equal(first[k], initial[k]) for k in initial)
    can.losses(STUDENT, TEACHER.softmax(1), IMAGES, 2.0)
    second = can.extra_state()
    # extra_state is a snapshot: the second update shows against the first one's copy.
    assert any(not torch.equal(second[k], first[k]) for k in first)
    # Seeded, whatever the global RNG: a second instance fed the same batch ends with the same D.
    torch.manual_seed(123)
    twin = make_can(can_lr=1e-3)
    twin.losses(STUDENT, TEACHER.softmax(1), IMAGES, 1.0)
    assert all(torch.equal(twin.extra_state()[k], first[k]) for k in first)


def test_can_loss_values() -> None:
    real, fake = TEACHER.softmax(1), STUDENT.softmax(1)
    initial = make_discriminator(C)
    with torch.no_grad():
        expected_d = F.binary_cross_entropy_with_logits(
            initial(real), torch.ones(2, 1)
        ) + F.binary_cross_entropy_with_logits(initial(fake), torch.zeros(2, 1))
    can = make_can(can_lr=1e-3)
    parts = can.losses(STUDENT, real, IMAGES, 1.0)
    assert parts["d_loss"].item() == pytest.approx(expected_d.item(), rel=1e-6)
    # The student's term uses the updated D, with the "real" label (non-saturating form).
    with torch.no_grad():
        expected_adv = F.binary_cross_entropy_with_logits(can.discriminator(fake), torch.ones(2, 1))
    assert parts["adv"].item() == pytest.approx(expected_adv.item(), rel=1e-6)


def test_can_adversarial_gradient_moves_student_toward_teacher_side() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(8) % C
    teacher = 6.0 * F.one_hot(labels, C).float()  # peaked: "real"
    student = 0.1 * torch.randn(8, C, generator=gen)  # near uniform: "fake"
    can = make_can(can_lr=1e-2)
    for epoch in range(20):
        can.losses(student, teacher.softmax(1), IMAGES, float(epoch))
    disc = can.discriminator
    assert disc(teacher.softmax(1)).mean() > disc(student.softmax(1)).mean()

    logits = student.clone().requires_grad_(True)
    can.losses(logits, teacher.softmax(1), IMAGES, 20.0)["adv"].backward()
    with torch.no_grad():
        before = disc(logits.softmax(1)).mean()
        after = disc((logits - 0.1 * logits.grad).softmax(1)).mean()
    assert after > before


def test_can_extra_state_round_trips() -> None:
    source = make_can(can_lr=1e-3)
    source.losses(STUDENT, TEACHER.softmax(1), IMAGES, 1.0)
    state = source.extra_state()
    assert set(state) == set(make_discriminator(C).state_dict())

    target = make_can(can_lr=1e-3)
    target.load_extra_state(state)
    assert all(torch.equal(target.extra_state()[k], v) for k, v in state.items())
    probe = torch.softmax(torch.randn(5, C, generator=torch.Generator().manual_seed(2)), 1)
    torch.testing.assert_close(target.discriminator(probe), source.discriminator(probe))
    # The loaded D is the one its optimizer trains.
    target.losses(STUDENT, TEACHER.softmax(1), IMAGES, 2.0)
    assert any(not torch.equal(target.extra_state()[k], v) for k, v in state.items())


# ============================================================================ supervised
def test_supervised_is_cross_entropy_on_labels() -> None:
    sup = get_distiller("supervised", DistillContext(num_classes=C))
    assert isinstance(sup, Supervised)
    labels = torch.tensor([1, 2])
    parts = sup.losses(STUDENT, TEACHER.softmax(1), IMAGES, 1.0, labels=labels)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(STUDENT, labels).item(), rel=1e-6)
    # The teacher plays no part.
    assert (
        sup.losses(STUDENT, TEACHER.flip(0).softmax(1), IMAGES, 1.0, labels=labels)["loss"].item()
        == parts["loss"].item()
    )
    with pytest.raises(ValueError, match="labels"):
        sup.losses(STUDENT, TEACHER.softmax(1), IMAGES, 1.0)


def test_only_supervised_uses_labels() -> None:
    assert get_class("supervised").uses_labels is True
    for name in ("kd", "mekd", "dkd", "cdl", "can"):
        assert get_class(name).uses_labels is False


# ============================================================================ registry
def test_methods_include_the_baselines() -> None:
    names = set(methods())
    assert {"dkd", "cdl", "can", "supervised", "kd", "mekd"} <= names
    for name in ("dkd", "cdl", "can", "supervised"):
        assert needs_generator(name) is False
