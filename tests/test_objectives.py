"""Tests for hf_distill.losses.objectives against slow, explicit float64 references (docs/algorithms.md).

Every reference below is an explicit loop over samples and classes with math.exp/math.log (or numpy
float64 for Pearson), never a hard-coded output of the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_distill.losses.objectives import (
    DISTILL_LOSSES,
    dist_loss,
    distillation_loss,
    ensemble_teacher_logits,
    generalized_jsd,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    token_mask,
)

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
REDUCTIONS = ("mean", "sum", "none")


# --- slow references ---------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> list[list[float]]:
    """A 2-D tensor as nested Python floats (float64), exactly the values the code sees."""
    return x.detach().double().tolist()


def ref_log_softmax(row: list[float], tau: float) -> list[float]:
    scaled = [v / tau for v in row]
    m = max(scaled)
    log_z = m + math.log(sum(math.exp(v - m) for v in scaled))
    return [v - log_z for v in scaled]


def ref_softmax(row: list[float], tau: float) -> list[float]:
    return [math.exp(v) for v in ref_log_softmax(row, tau)]


def ref_kl(p: list[float], log_p: list[float], log_q: list[float]) -> float:
    """KL(p ‖ q) = Σ_c p_c (log p_c − log q_c), with 0·log 0 = 0."""
    total = 0.0
    for pc, lp, lq in zip(p, log_p, log_q, strict=True):
        if pc > 0.0:
            total += pc * (lp - lq)
    return total


def ref_kl_per_sample(student, teacher, tau: float, scale: bool = True) -> list[float]:
    """τ² · KL(p_t ‖ p_s) for each row."""
    out = []
    for zs, zt in zip(_rows(student), _rows(teacher), strict=True):
        log_ps, log_pt = ref_log_softmax(zs, tau), ref_log_softmax(zt, tau)
        pt = [math.exp(v) for v in log_pt]
        value = ref_kl(pt, log_pt, log_ps)
        out.append(value * tau**2 if scale else value)
    return out


def ref_reverse_kl_per_sample(student, teacher, tau: float, scale: bool = True) -> list[float]:
    """τ² · KL(p_s ‖ p_t) for each row."""
    out = []
    for zs, zt in zip(_rows(student), _rows(teacher), strict=True):
        log_ps, log_pt = ref_log_softmax(zs, tau), ref_log_softmax(zt, tau)
        ps = [math.exp(v) for v in log_ps]
        value = ref_kl(ps, log_ps, log_pt)
        out.append(value * tau**2 if scale else value)
    return out


def ref_jsd_per_sample(student, teacher, beta: float, tau: float, scale: bool = True) -> list[float]:
    """β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β p_t + (1−β) p_s, times τ² by default."""
    out = []
    for zs, zt in zip(_rows(student), _rows(teacher), strict=True):
        ps, pt = ref_softmax(zs, tau), ref_softmax(zt, tau)
        m = [beta * a + (1.0 - beta) * b for a, b in zip(pt, ps, strict=True)]
        kl_t_m = sum(a * math.log(a / c) for a, c in zip(pt, m, strict=True) if a > 0)
        kl_s_m = sum(b * math.log(b / c) for b, c in zip(ps, m, strict=True) if b > 0)
        value = beta * kl_t_m + (1.0 - beta) * kl_s_m
        out.append(value * tau**2 if scale else value)
    return out


def ref_mse_per_sample(student, teacher) -> list[float]:
    out = []
    for zs, zt in zip(_rows(student), _rows(teacher), strict=True):
        out.append(sum((a - b) ** 2 for a, b in zip(zs, zt, strict=True)) / len(zs))
    return out


def ref_pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook Pearson correlation with explicit sums."""
    n = len(x)
    mx = sum(x) / n
    my = sum(y) / n
    cov = sum((x[i] - mx) * (y[i] - my) for i in range(n))
    sx = math.sqrt(sum((x[i] - mx) ** 2 for i in range(n)))
    sy = math.sqrt(sum((y[i] - my) ** 2 for i in range(n)))
    return cov / (sx * sy)


def ref_dist_terms(student, teacher, tau: float) -> tuple[list[float], list[float]]:
    """(inter per sample, intra per class) for DIST: 1 − Pearson across classes / across the batch."""
    ps = np.array([ref_softmax(r, tau) for r in _rows(student)], dtype=np.float64)
    pt = np.array([ref_softmax(r, tau) for r in _rows(teacher)], dtype=np.float64)
    n, c = ps.shape
    inter = [1.0 - ref_pearson(ps[i, :], pt[i, :]) for i in range(n)]
    intra = [1.0 - ref_pearson(ps[:, j], pt[:, j]) for j in range(c)]
    return inter, intra


def reduce_ref(values: list[float], reduction: str):
    if reduction == "mean":
        return sum(values) / len(values)
    if reduction == "sum":
        return sum(values)
    return values


def assert_close(got: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(
        got.detach().double().numpy(), np.asarray(expected, dtype=np.float64), rtol, atol
    )


def make_logits(
    n: int = 5, c: int = 7, scale: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale


# --- kl ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_matches_loop(tau, reduction):
    s, t = make_logits()
    got = kl_divergence(s, t, temperature=tau, reduction=reduction)
    expected = reduce_ref(ref_kl_per_sample(s, t, tau), reduction)
    assert got.shape == (() if reduction != "none" else (s.shape[0],))
    assert_close(got, expected)


@pytest.mark.parametrize("tau", (0.5, 2.0, 4.0))
def test_kl_without_temperature_squared(tau):
    s, t = make_logits(seed=1)
    got = kl_divergence(s, t, temperature=tau, scale_by_temperature_squared=False, reduction="none")
    assert_close(got, ref_kl_per_sample(s, t, tau, scale=False))
    scaled = kl_divergence(s, t, temperature=tau, reduction="none")
    assert_close(scaled, (got * tau**2).detach())


def test_kl_is_not_symmetric_and_positive():
    s, t = make_logits(seed=2)
    forward = kl_divergence(s, t, reduction="none")
    backward = kl_divergence(t, s, reduction="none")
    assert (forward > 0).all()
    assert not torch.allclose(forward, backward)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_kl_low_precision_inputs_computed_in_float32(dtype):
    s, t = make_logits(n=6, c=9, scale=4.0, seed=3)
    s, t = s.to(dtype), t.to(dtype)
    for tau in (1.0, 3.0):
        got = kl_divergence(s, t, temperature=tau, reduction="none")
        assert got.dtype == torch.float32
        # Reference from the same rounded inputs, in float64: float32 math is far tighter than fp16 math.
        assert_close(got, ref_kl_per_sample(s, t, tau), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_all_losses_return_float32_for_low_precision_inputs(dtype):
    s, t = make_logits(seed=4)
    s, t = s.to(dtype), t.to(dtype)
    for name in DISTILL_LOSSES:
        assert distillation_loss(s, t, name, temperature=2.0).dtype == torch.float32, name
    assert_close(logit_mse(s, t, reduction="none"), ref_mse_per_sample(s, t))
    assert_close(
        generalized_jsd(s, t, beta=0.3, temperature=2.0, reduction="none"),
        ref_jsd_per_sample(s, t, 0.3, 2.0),
        rtol=1e-4,
        atol=1e-5,
    )


def _kl_student_grad_norm(student, teacher, tau: float, scale: bool) -> float:
    z = student.clone().requires_grad_(True)
    kl_divergence(z, teacher, temperature=tau, scale_by_temperature_squared=scale).backward()
    return z.grad.norm().item()


def test_temperature_squared_keeps_gradient_scale():
    s, t = make_logits(n=16, c=10, scale=1.0, seed=5)
    taus = (4.0, 8.0, 16.0)
    scaled = [_kl_student_grad_norm(s, t, tau, scale=True) for tau in taus]
    assert max(scaled) / min(scaled) < 1.25, scaled
    unscaled = [_kl_student_grad_norm(s, t, tau, scale=False) for tau in taus]
    # Without τ² the gradient shrinks like 1/τ²: a factor ≈ 16 between τ=4 and τ=16.
    assert unscaled[0] / unscaled[2] > 8.0, unscaled
    assert unscaled[0] > unscaled[1] > unscaled[2]


# --- reverse kl --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reverse_kl_matches_loop(tau, reduction):
    s, t = make_logits(seed=6)
    got = reverse_kl_divergence(s, t, temperature=tau, reduction=reduction)
    assert_close(got, reduce_ref(ref_reverse_kl_per_sample(s, t, tau), reduction))
    unscaled = reverse_kl_divergence(
        s, t, temperature=tau, scale_by_temperature_squared=False, reduction="none"
    )
    assert_close(unscaled, ref_reverse_kl_per_sample(s, t, tau, scale=False))


# --- jsd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", (1.0, 2.0))
def test_jsd_endpoints_are_forward_and_reverse_kl(tau):
    s, t = make_logits(seed=7)
    for scale in (True, False):
        kw = {"temperature": tau, "scale_by_temperature_squared": scale, "reduction": "none"}
        assert_close(generalized_jsd(s, t, beta=0.0, **kw), kl_divergence(s, t, **kw))
        assert_close(generalized_jsd(s, t, beta=1.0, **kw), reverse_kl_divergence(s, t, **kw))
        assert_close(generalized_jsd(s, t, beta=0.0, **kw), ref_kl_per_sample(s, t, tau, scale))
        assert_close(generalized_jsd(s, t, beta=1.0, **kw), ref_reverse_kl_per_sample(s, t, tau, scale))


@pytest.mark.parametrize("beta", (0.5, 0.1, 0.3, 0.9))
@pytest.mark.parametrize("tau", (1.0, 2.5))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jsd_matches_loop(beta, tau, reduction):
    s, t = make_logits(seed=8)
    got = generalized_jsd(s, t, beta=beta, temperature=tau, reduction=reduction)
    assert_close(got, reduce_ref(ref_jsd_per_sample(s, t, beta, tau), reduction))
    unscaled = generalized_jsd(
        s, t, beta=beta, temperature=tau, scale_by_temperature_squared=False, reduction="none"
    )
    assert_close(unscaled, ref_jsd_per_sample(s, t, beta, tau, scale=False))


def test_jsd_near_endpoints_follows_the_mixture_formula():
    # Only β = 0 and β = 1 exactly are special-cased to forward / reverse KL (TRL's convention); just inside
    # the interval the mixture formula applies, finite and matching the loop.
    s, t = make_logits(seed=9, scale=1.0)
    eps = 1e-4
    for beta in (eps, 1.0 - eps):
        value = generalized_jsd(s, t, beta=beta, reduction="none")
        assert torch.isfinite(value).all()
        assert_close(value, ref_jsd_per_sample(s, t, beta, 1.0), rtol=1e-3, atol=1e-6)


def test_jsd_symmetric_at_half():
    s, t = make_logits(seed=10)
    for tau in (1.0, 3.0):
        a = generalized_jsd(s, t, beta=0.5, temperature=tau, reduction="none")
        b = generalized_jsd(t, s, beta=0.5, temperature=tau, reduction="none")
        assert_close(a, b.detach())
    # ... and not symmetric elsewhere.
    a = generalized_jsd(s, t, beta=0.2, reduction="none")
    b = generalized_jsd(t, s, beta=0.2, reduction="none")
    assert not torch.allclose(a, b)


def test_jsd_bounded_by_log2_times_tau_squared():
    s, t = make_logits(seed=11, scale=20.0)
    tau = 2.0
    value = generalized_jsd(s, t, beta=0.5, temperature=tau, reduction="none")
    assert (value <= tau**2 * math.log(2.0) + 1e-5).all()
    assert (value >= 0).all()


@pytest.mark.parametrize("beta", (-0.1, 1.1, 2.0, float("nan")))
def test_jsd_beta_out_of_range_raises(beta):
    s, t = make_logits()
    with pytest.raises(ValueError):
        generalized_jsd(s, t, beta=beta)
    with pytest.raises(ValueError):
        distillation_loss(s, t, "jsd", jsd_beta=beta)


# --- mse ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_matches_loop(reduction):
    s, t = make_logits(seed=12)
    assert_close(logit_mse(s, t, reduction=reduction), reduce_ref(ref_mse_per_sample(s, t), reduction))


def test_mse_ignores_temperature_via_dispatch():
    s, t = make_logits(seed=13)
    expected = sum(ref_mse_per_sample(s, t)) / s.shape[0]
    for tau in (1.0, 4.0):
        assert_close(distillation_loss(s, t, "mse", temperature=tau), expected)


# --- dist --------------------------------------------------------------------------------------------

DIST_STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 2.0], [3.0, 0.0, 1.0]])
DIST_TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.5, -0.5, 1.5], [1.0, 1.0, 3.0]])


def test_dist_small_case_mean_and_sum():
    s, t = DIST_STUDENT, DIST_TEACHER
    inter, intra = ref_dist_terms(s, t, 1.0)
    n = s.shape[0]
    expected_mean = sum(inter) / n + sum(intra) / len(intra)
    assert_close(dist_loss(s, t, temperature=1.0), expected_mean)
    assert_close(dist_loss(s, t, temperature=1.0, reduction="sum"), n * expected_mean)
    for w in (0.0, 0.5, 2.0):
        expected = sum(inter) / n + w * sum(intra) / len(intra)
        assert_close(dist_loss(s, t, intra_weight=w), expected)
        assert_close(dist_loss(s, t, intra_weight=w, reduction="sum"), n * expected)
    # Sanity of the hand case: the terms are genuinely non-trivial.
    assert all(0.0 < v < 2.0 for v in inter + intra)


def test_dist_per_sample_inter_without_intra():
    s, t = DIST_STUDENT, DIST_TEACHER
    inter, _ = ref_dist_terms(s, t, 1.0)
    got = dist_loss(s, t, intra_weight=0.0, reduction="none")
    assert got.shape == (3,)
    assert_close(got, inter)


@pytest.mark.parametrize("tau", (2.0, 4.0))
def test_dist_temperature_scaling(tau):
    s, t = make_logits(n=6, c=5, scale=3.0, seed=14)
    inter, intra = ref_dist_terms(s, t, tau)
    unscaled = sum(inter) / len(inter) + sum(intra) / len(intra)
    assert_close(dist_loss(s, t, temperature=tau), tau**2 * unscaled)
    assert_close(dist_loss(s, t, temperature=tau, scale_by_temperature_squared=False), unscaled)
    assert_close(
        dist_loss(s, t, temperature=tau, intra_weight=0.0, reduction="none"), [tau**2 * v for v in inter]
    )


def test_dist_none_with_intra_raises():
    s, t = DIST_STUDENT, DIST_TEACHER
    with pytest.raises(ValueError):
        dist_loss(s, t, reduction="none")
    with pytest.raises(ValueError):
        dist_loss(s, t, intra_weight=0.5, reduction="none")
    with pytest.raises(ValueError):
        distillation_loss(s, t, "dist", reduction="none")


def test_dist_single_sample_has_only_inter():
    # With one sample the across-batch correlation is undefined; the loss is the inter term alone.
    s, t = DIST_STUDENT[:1], DIST_TEACHER[:1]
    ps, pt = ref_softmax(_rows(s)[0], 1.0), ref_softmax(_rows(t)[0], 1.0)
    assert_close(dist_loss(s, t), 1.0 - ref_pearson(np.array(ps), np.array(pt)))


# --- reductions and shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", DISTILL_LOSSES)
def test_unknown_reduction_raises(name):
    s, t = make_logits()
    with pytest.raises(ValueError, match="reduction must be one of"):
        distillation_loss(s, t, name, reduction="average")


@pytest.mark.parametrize("name", DISTILL_LOSSES)
def test_shape_mismatch_raises(name):
    s, t = make_logits(c=7)
    with pytest.raises(ValueError):
        distillation_loss(s, t[:, :5], name)
    with pytest.raises(ValueError):
        distillation_loss(s, t[:3], name)
    # Objectives take flattened (N, C) logits only.
    with pytest.raises(ValueError):
        distillation_loss(s.view(5, 7, 1), t.view(5, 7, 1), name)


# --- dispatch ----------------------------------------------------------------------------------------


def test_distillation_loss_dispatches_to_each_function():
    s, t = make_logits(seed=15)
    tau, beta, w = 2.0, 0.3, 0.5
    for scale in (True, False):
        for reduction in ("mean", "sum"):
            direct = {
                "kl": kl_divergence(s, t, tau, scale, reduction),
                "reverse_kl": reverse_kl_divergence(s, t, tau, scale, reduction),
                "mse": logit_mse(s, t, reduction),
                "jsd": generalized_jsd(s, t, beta, tau, scale, reduction),
                "dist": dist_loss(s, t, tau, w, scale, reduction),
            }
            assert set(direct) == set(DISTILL_LOSSES)
            values = []
            for name in DISTILL_LOSSES:
                got = distillation_loss(
                    s,
                    t,
                    name,
                    temperature=tau,
                    scale_by_temperature_squared=scale,
                    jsd_beta=beta,
                    dist_intra_weight=w,
                    reduction=reduction,
                )
                torch.testing.assert_close(got, direct[name], rtol=0, atol=0)
                values.append(got.item())
            assert len(set(values)) == len(values), "each name must reach a different objective"
    # Defaults: kl at τ = 1.
    assert_close(distillation_loss(s, t), sum(ref_kl_per_sample(s, t, 1.0)) / s.shape[0])


def test_distillation_loss_unknown_name_lists_choices():
    s, t = make_logits()
    with pytest.raises(ValueError) as info:
        distillation_loss(s, t, "cosine")
    message = str(info.value)
    assert "cosine" in message
    for name in DISTILL_LOSSES:
        assert name in message


# --- numerical robustness ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DISTILL_LOSSES)
@pytest.mark.parametrize("tau", (1.0, 4.0))
def test_identical_logits_zero_loss_finite_grad(name, tau):
    t, _ = make_logits(n=6, c=5, scale=2.0, seed=16)
    z = t.clone().requires_grad_(True)
    loss = distillation_loss(z, t.clone(), name, temperature=tau)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # dist: inter is 0 for identical rows, and intra is 0 too since every class column is identical, up to
    # the Pearson eps (1e-8 added to the norm product, as in the DIST reference code): 1 − ‖a‖²/(‖a‖² + eps)
    # ≈ eps/‖a‖², which grows as τ flattens the distributions, then times τ².
    tol = 1e-5 if name != "dist" else 1e-5 * tau**2
    assert abs(loss.item()) < tol, (name, loss.item())
    if name != "dist":
        assert z.grad.abs().max().item() < 1e-5


def test_identical_logits_jsd_any_beta_is_zero():
    t, _ = make_logits(seed=17)
    for beta in (0.0, 0.25, 0.5, 0.75, 1.0):
        z = t.clone().requires_grad_(True)
        loss = generalized_jsd(z, t, beta=beta, temperature=2.0)
        loss.backward()
        assert abs(loss.item()) < 1e-6
        assert torch.isfinite(z.grad).all()


EXTREME_STUDENT = [
    [1e4, -1e4, 0.0, 3.0, -2.0],
    [-1e9, -1e9, -1e9, -1e9, -1e9],
    [0.0, -1e9, 5.0, -1e9, 1.0],
    [1e4, 1e4, -1e4, 0.0, -1e9],
]
EXTREME_TEACHER = [
    [-1e4, 1e4, 0.0, -3.0, 2.0],
    [-1e9, -1e9, -1e9, -1e9, -1e9],
    [-1e9, 2.0, 5.0, -1e9, 0.0],
    [-1e9, 1e4, 1e4, 0.0, 1e4],
]


@pytest.mark.parametrize("name", DISTILL_LOSSES)
@pytest.mark.parametrize("tau", (1.0, 4.0))
def test_extreme_logits_finite_loss_and_grad(name, tau):
    s = torch.tensor(EXTREME_STUDENT, requires_grad=True)
    t = torch.tensor(EXTREME_TEACHER)
    for pair in ((s, t), (s, s.detach().clone()), (s, t.flip(0))):
        s.grad = None
        loss = distillation_loss(*pair, name, temperature=tau)
        loss.backward()
        assert torch.isfinite(loss), (name, loss)
        assert torch.isfinite(s.grad).all(), (name, s.grad)


@pytest.mark.parametrize("name", DISTILL_LOSSES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision_extreme_logits_finite_loss_and_grad(name, dtype):
    # float16: its own extremes (±65504). bfloat16 shares float32's range, so its "max" would overflow any
    # float32 difference; use the largest magnitudes a model plausibly emits (masking values) instead.
    big = torch.finfo(torch.float16).max if dtype == torch.float16 else 1e9
    g = torch.Generator().manual_seed(18)
    # Rows of (N=4, C=8): mixes of ±max and ordinary values. MSE gradients 2·Δz/(N·C) stay in range.
    s_base = torch.randn(4, 8, generator=g) * 3
    t_base = torch.randn(4, 8, generator=g) * 3
    s_base[0, 0], s_base[0, 1], t_base[0, 0], t_base[0, 1] = big, -big, -big, big
    s_base[1, :] = -big
    t_base[1, :] = -big
    s_base[2, 3], t_base[2, 5] = big, big
    s = s_base.to(dtype).requires_grad_(True)
    t = t_base.to(dtype)
    for tau in (1.0, 4.0):
        for target in (t, s.detach().clone()):
            s.grad = None
            loss = distillation_loss(s, target, name, temperature=tau)
            loss.backward()
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss), (name, tau, loss)
            assert torch.isfinite(s.grad).all(), (name, tau, s.grad)


def test_extreme_kl_matches_reference():
    # Finite extremes: the exact value is still computable by the log-space loop.
    s = torch.tensor(EXTREME_STUDENT)
    t = torch.tensor(EXTREME_TEACHER)
    for tau in (1.0, 4.0):
        assert_close(kl_divergence(s, t, tau, reduction="none"), ref_kl_per_sample(s, t, tau), rtol=1e-5)
        assert_close(
            reverse_kl_divergence(s, t, tau, reduction="none"),
            ref_reverse_kl_per_sample(s, t, tau),
            rtol=1e-5,
        )


# --- ensemble_teacher_logits -------------------------------------------------------------------------


def _ref_mixture(teachers: list[torch.Tensor], weights: list[float], tau: float) -> np.ndarray:
    total = sum(weights)
    w = [x / total for x in weights]
    n, c = teachers[0].shape
    out = np.zeros((n, c), dtype=np.float64)
    for k, z in enumerate(teachers):
        for i, row in enumerate(_rows(z)):
            p = ref_softmax(row, tau)
            for j in range(c):
                out[i, j] += w[k] * p[j]
    return out


@pytest.mark.parametrize("tau", (1.0, 2.0, 0.5))
def test_ensemble_probs_is_mixture_of_softened_distributions(tau):
    g = torch.Generator().manual_seed(19)
    teachers = [torch.randn(4, 6, generator=g) * 3 for _ in range(3)]
    for weights in ([1.0, 2.0, 3.0], [0.2, 0.0, 0.8], None):
        result = ensemble_teacher_logits(teachers, weights, temperature=tau)
        assert result.shape == (4, 6)
        expected = _ref_mixture(teachers, weights or [1.0, 1.0, 1.0], tau)
        assert_close(torch.softmax(result.double() / tau, dim=-1), expected, rtol=1e-5, atol=1e-7)


def test_ensemble_probs_on_token_shaped_logits():
    g = torch.Generator().manual_seed(20)
    teachers = [torch.randn(2, 3, 5, generator=g) for _ in range(2)]
    tau = 2.0
    result = ensemble_teacher_logits(teachers, [1.0, 3.0], temperature=tau)
    assert result.shape == (2, 3, 5)
    flat = [z.reshape(6, 5) for z in teachers]
    expected = _ref_mixture(flat, [1.0, 3.0], tau)
    assert_close(torch.softmax(result.reshape(6, 5).double() / tau, dim=-1), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", (1.0, 3.0))
def test_ensemble_single_or_identical_teachers_equal_one_teacher(tau):
    s, t = make_logits(seed=21)
    reference = kl_divergence(s, t, temperature=tau)
    expected_p = [ref_softmax(row, tau) for row in _rows(t)]
    for teachers, weights in (([t], None), ([t, t.clone()], None), ([t, t.clone()], [0.3, 0.7])):
        combined = ensemble_teacher_logits(teachers, weights, temperature=tau)
        assert_close(torch.softmax(combined.double() / tau, dim=-1), expected_p, rtol=1e-5, atol=1e-7)
        assert_close(kl_divergence(s, combined, temperature=tau), reference.item(), rtol=1e-5, atol=1e-6)
        for name in DISTILL_LOSSES:
            if name == "mse":
                continue  # logit matching needs average="logits"; τ·log p differs from z by a constant
            direct = distillation_loss(s, t, name, temperature=tau, dist_intra_weight=1.0)
            via_ensemble = distillation_loss(s, combined, name, temperature=tau, dist_intra_weight=1.0)
            assert_close(via_ensemble, direct.item(), rtol=1e-5, atol=1e-6)


def test_ensemble_weights_are_normalised():
    g = torch.Generator().manual_seed(22)
    teachers = [torch.randn(3, 4, generator=g) * 2 for _ in range(2)]
    for average in ("probs", "logits"):
        a = ensemble_teacher_logits(teachers, [2.0, 6.0], temperature=2.0, average=average)
        b = ensemble_teacher_logits(teachers, [0.25, 0.75], temperature=2.0, average=average)
        c = ensemble_teacher_logits(teachers, [1.0, 3.0], temperature=2.0, average=average)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # Uniform by default.
    torch.testing.assert_close(
        ensemble_teacher_logits(teachers, None, average="logits"),
        ensemble_teacher_logits(teachers, [5.0, 5.0], average="logits"),
    )


def test_ensemble_logits_average_is_weighted_mean():
    g = torch.Generator().manual_seed(23)
    teachers = [torch.randn(3, 4, generator=g) * 2 for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    result = ensemble_teacher_logits(teachers, weights, temperature=3.0, average="logits")
    total = sum(weights)
    rows = [_rows(z) for z in teachers]
    expected = [
        [sum(weights[k] * rows[k][i][j] for k in range(3)) / total for j in range(4)] for i in range(3)
    ]
    assert result.dtype == torch.float32
    assert_close(result, expected)


def test_ensemble_low_precision_teachers_give_float32():
    g = torch.Generator().manual_seed(24)
    teachers = [(torch.randn(3, 4, generator=g) * 2).to(torch.bfloat16) for _ in range(2)]
    result = ensemble_teacher_logits(teachers, temperature=2.0)
    assert result.dtype == torch.float32
    expected = _ref_mixture(teachers, [1.0, 1.0], 2.0)
    assert_close(torch.softmax(result.double() / 2.0, dim=-1), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "weights",
    ([-1.0, 2.0], [1.0], [1.0, 1.0, 1.0], [0.0, 0.0]),
    ids=("negative", "too_few", "too_many", "all_zero"),
)
def test_ensemble_bad_weights_raise(weights):
    teachers = [torch.zeros(2, 3), torch.ones(2, 3)]
    with pytest.raises(ValueError):
        ensemble_teacher_logits(teachers, weights)


def test_ensemble_no_teachers_or_bad_average_raise():
    with pytest.raises(ValueError):
        ensemble_teacher_logits([])
    with pytest.raises(ValueError):
        ensemble_teacher_logits([torch.zeros(2, 3)], average="median")


# --- token_mask --------------------------------------------------------------------------------------

LABELS = torch.tensor([[-100, 5, 6, -100, 7], [1, -100, 2, 3, -100]])


def test_token_mask_from_labels():
    mask = token_mask(LABELS, None, shift=False)
    expected = [[LABELS[i, j].item() != -100 for j in range(5)] for i in range(2)]
    assert mask.dtype == torch.bool
    assert mask.tolist() == expected


def test_token_mask_causal_shift():
    mask = token_mask(LABELS, None, shift=True)
    assert mask.shape == (2, 4)
    # Logits at position t predict label t+1, so mask[:, t] is whether label t+1 counts.
    expected = [[LABELS[i, t + 1].item() != -100 for t in range(4)] for i in range(2)]
    assert mask.tolist() == expected
    # It lines up with the shifted labels used by a causal-LM loss.
    shifted_labels = LABELS[:, 1:]
    assert (shifted_labels[mask] != -100).all()
    assert (shifted_labels[~mask] == -100).all()


def test_token_mask_labels_take_priority_over_attention_mask():
    attention = torch.ones_like(LABELS)
    assert token_mask(LABELS, attention, shift=False).tolist() == token_mask(LABELS, None, False).tolist()
    assert token_mask(LABELS, attention, shift=True).tolist() == token_mask(LABELS, None, True).tolist()


def test_token_mask_falls_back_to_attention_mask():
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask = token_mask(None, attention, shift=False)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[bool(v) for v in row] for row in attention.tolist()]
    shifted = token_mask(None, attention, shift=True)
    assert shifted.tolist() == [[bool(v) for v in row[1:]] for row in attention.tolist()]


def test_token_mask_none_without_labels_or_attention():
    assert token_mask(None, None, shift=False) is None
    assert token_mask(None, None, shift=True) is None


# --- the loss registry ------------------------------------------------------------------------------------


def test_registry_entries_carry_the_properties_callers_need():
    from hf_distill.losses.objectives import DISTILL_LOSS_REGISTRY, DistillationObjective

    assert set(DISTILL_LOSS_REGISTRY) == set(DISTILL_LOSSES)
    mse = DISTILL_LOSS_REGISTRY["mse"]
    assert mse.compares_logits and not mse.uses_temperature
    assert all(
        e.uses_temperature and not e.compares_logits for n, e in DISTILL_LOSS_REGISTRY.items() if n != "mse"
    )
    assert DistillationObjective("dist", dist_intra_weight=0.5).is_per_sample is False
    assert DistillationObjective("dist", dist_intra_weight=0.0).is_per_sample is True
    assert DistillationObjective("kl").is_per_sample and DistillationObjective("jsd").entry.settings == (
        "jsd_beta",
    )
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    objective = DistillationObjective("jsd", temperature=2.0, jsd_beta=0.3)
    assert_close(objective(s, t, "none"), generalized_jsd(s, t, 0.3, 2.0, reduction="none"))
    with pytest.raises(ValueError, match="Unknown distillation loss 'l2'"):
        DistillationObjective("l2")(s, t)


@pytest.fixture
def cubed_gap_loss():
    """A user loss registered as "cubed_gap" for one test: mean over classes of |z_s − z_t|³ / τ."""
    from hf_distill import register_distill_loss
    from hf_distill.losses.objectives import DISTILL_LOSS_REGISTRY

    @register_distill_loss("cubed_gap", compares_logits=True)
    def cubed_gap(student_logits, teacher_logits, objective, reduction):
        per_sample = (student_logits.float() - teacher_logits.float()).abs().pow(3).mean(-1)
        per_sample = per_sample / objective.temperature
        if reduction == "none":
            return per_sample
        return per_sample.sum() if reduction == "sum" else per_sample.mean()

    yield cubed_gap
    DISTILL_LOSS_REGISTRY.pop("cubed_gap")


def test_a_registered_loss_is_accepted_by_the_arguments_and_used_by_the_trainer(
    cubed_gap_loss, tmp_path, tokenizer
):
    from testing_utils import keyword_dataset, tiny_classifier, tiny_run_args

    from hf_distill import DistillationTrainer, DistillationTrainingArguments, registered_distill_losses
    from hf_distill.losses.objectives import DistillationObjective

    assert "cubed_gap" in registered_distill_losses()
    args = tiny_run_args(
        DistillationTrainingArguments, tmp_path, distill_loss="cubed_gap", alpha=1.0, temperature=2.0
    )
    teacher, student = tiny_classifier(layers=2, seed=1), tiny_classifier(layers=1, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=keyword_dataset(8),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))  # alpha=1: the distillation term alone
        expected = cubed_gap_loss(
            student(**inputs).logits, teacher(**inputs).logits, DistillationObjective.from_args(args), "mean"
        )
    assert expected > 0
    assert_close(loss, expected)


def test_registering_a_name_twice_is_an_error(cubed_gap_loss):
    from hf_distill import register_distill_loss

    for name in ("kl", "cubed_gap"):
        with pytest.raises(ValueError, match=f"loss named '{name}' is already registered"):
            register_distill_loss(name)(lambda s, t, o, r: s.sum())
    with pytest.raises(ValueError, match="unknown settings \\['beta'\\]"):
        register_distill_loss("other", settings=("beta",))


def test_an_unknown_loss_is_refused_naming_the_registered_ones(cubed_gap_loss, tmp_path):
    from testing_utils import tiny_run_args

    from hf_distill import DistillationTrainingArguments

    with pytest.raises(ValueError) as info:
        tiny_run_args(DistillationTrainingArguments, tmp_path, distill_loss="l3")
    message = str(info.value)
    assert "distill_loss='l3' is unknown" in message and "register_distill_loss" in message
    for name in (*DISTILL_LOSSES, "cubed_gap"):
        assert repr(name) in message


def test_online_teacher_loss_treats_the_student_as_a_constant_target():
    from hf_distill.losses.objectives import online_teacher_loss

    z_t = torch.randn(5, 3, requires_grad=True)
    z_s = torch.randn(5, 3, requires_grad=True)
    task = torch.tensor(0.7)
    loss, divergence = online_teacher_loss(z_t, z_s, 0.4, temperature=2.0, task_loss=task)
    expected_kl = sum(ref_kl_per_sample(z_t.detach(), z_s.detach(), 2.0)) / 5  # KL(p_s ‖ p_t), τ²-scaled
    assert_close(divergence, expected_kl)
    assert_close(loss, 0.4 * expected_kl + 0.6 * 0.7)
    loss.backward()
    assert z_s.grad is None and z_t.grad is not None  # only the teacher learns from it
    regression, mse = online_teacher_loss(torch.ones(4, 1), torch.zeros(4, 1), 0.5, regression=True)
    assert_close(mse, torch.tensor(1.0))
    assert_close(regression, torch.tensor(0.5))  # no task loss given: α_t · mse only


def test_labelled_cross_entropy_ignores_minus_100_and_never_divides_by_zero():
    from hf_distill.losses.objectives import labelled_cross_entropy

    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([0, -100, 2, 1, -100])
    kept = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
    torch.testing.assert_close(labelled_cross_entropy(logits, labels), expected)
    none = labelled_cross_entropy(logits, torch.full((5,), -100))
    assert none.item() == 0.0 and none.requires_grad
