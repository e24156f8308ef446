"""Property tests for kd_ray.models.losses (plain torch, CPU, fast)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_ray.models.losses import LOSSES, combine_teacher_logits, compute_loss, distill_loss, hard_label_loss, mse_loss

NUM_CLASSES = 3
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 8.0]


def random_batch(seed: int, batch: int = 16, num_classes: int = NUM_CLASSES, scale: float = 1.0):
    """(student_logits, teacher_logits, gold) with every row labelled."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, num_classes, generator=g) * scale
    teacher = torch.randn(batch, num_classes, generator=g) * scale
    gold = torch.randint(0, num_classes, (batch,), generator=g)
    return student, teacher, gold


def kl_term(student, teacher, temperature):
    """T^2 * KL(p_teacher || p_student), written out from probabilities, mean over rows."""
    p_t = torch.softmax(teacher / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher / temperature, dim=-1)
    log_p_s = torch.log_softmax(student / temperature, dim=-1)
    return temperature**2 * (p_t * (log_p_t - log_p_s)).sum(-1).mean()


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", range(3))
def test_identical_logits_give_zero_kl(temperature, seed):
    logits, _, gold = random_batch(seed, scale=5.0)
    loss = distill_loss(logits, logits.clone(), gold, temperature=temperature, alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", range(3))
def test_kl_matches_written_out_formula_and_is_positive(temperature, seed):
    student, teacher, gold = random_batch(seed)
    loss = distill_loss(student, teacher, gold, temperature=temperature, alpha=1.0)
    torch.testing.assert_close(loss, kl_term(student, teacher, temperature))
    assert loss.item() > 0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_alpha_zero_is_plain_cross_entropy(temperature, seed):
    student, teacher, gold = random_batch(seed)
    loss = distill_loss(student, teacher, gold, temperature=temperature, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(student, gold), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_alpha_interpolates_linearly(seed):
    student, teacher, gold = random_batch(seed)
    expected = 0.3 * kl_term(student, teacher, 2.0) + 0.7 * F.cross_entropy(student, gold)
    loss = distill_loss(student, teacher, gold, temperature=2.0, alpha=0.3)
    torch.testing.assert_close(loss, expected)


def grad_norm(loss_fn, student, teacher, temperature):
    student = student.clone().requires_grad_()
    loss_fn(student, teacher, temperature).backward()
    return student.grad.norm().item()


@pytest.mark.parametrize("seed", range(5))
def test_t_squared_keeps_gradient_magnitude_across_temperatures(seed):
    student, teacher, _ = random_batch(seed, batch=32)
    temperatures = [1.0, 2.0, 4.0, 8.0]

    def with_t2(s, t, temp):
        return distill_loss(s, t, None, temperature=temp, alpha=1.0)

    def without_t2(s, t, temp):
        return F.kl_div(
            F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1),
            reduction="batchmean", log_target=True,
        )

    scaled = [grad_norm(with_t2, student, teacher, temp) for temp in temperatures]
    unscaled = [grad_norm(without_t2, student, teacher, temp) for temp in temperatures]
    assert max(scaled) / min(scaled) < 3.0
    # Without T^2 the gradient shrinks roughly like 1/T^2: from T=1 to T=8, ~64x.
    assert unscaled[0] / unscaled[-1] > 8.0**2 / 4
    for temp, s, u in zip(temperatures, scaled, unscaled):
        assert s == pytest.approx(temp**2 * u, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_rows_without_gold_only_add_distillation(alpha):
    student, teacher, gold = random_batch(seed=7, batch=10)
    gold[[1, 4, 5, 8]] = -100
    labelled = gold != -100
    temperature = 2.0
    expected = alpha * kl_term(student, teacher, temperature) + (1 - alpha) * F.cross_entropy(
        student[labelled], gold[labelled]
    )
    loss = distill_loss(student, teacher, gold, temperature=temperature, alpha=alpha)
    torch.testing.assert_close(loss, expected)


def test_unlabelled_rows_get_no_cross_entropy_gradient():
    student, teacher, gold = random_batch(seed=3, batch=6)
    gold[:3] = -100
    x = student.clone().requires_grad_()
    distill_loss(x, teacher, gold, temperature=2.0, alpha=0.0).backward()
    assert torch.all(x.grad[:3] == 0)
    assert torch.all(x.grad[3:].abs().sum(-1) > 0)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("gold_kind", ["all_ignored", "none"])
def test_batch_without_any_gold_is_finite_and_pure_distillation(alpha, gold_kind):
    student, teacher, gold = random_batch(seed=11)
    gold = torch.full_like(gold, -100) if gold_kind == "all_ignored" else None
    x = student.clone().requires_grad_()
    loss = distill_loss(x, teacher, gold, temperature=3.0, alpha=alpha)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, alpha * kl_term(student, teacher, 3.0))


def test_custom_ignore_index():
    student, teacher, gold = random_batch(seed=2, batch=8)
    gold[:4] = -1
    loss = distill_loss(student, teacher, gold, temperature=1.0, alpha=0.0, ignore_index=-1)
    torch.testing.assert_close(loss, F.cross_entropy(student[4:], gold[4:]))


def test_bf16_logits_give_float32_loss():
    student, teacher, gold = random_batch(seed=4)
    loss = distill_loss(student.bfloat16(), teacher.bfloat16(), gold, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_invalid_temperature_raises(temperature):
    student, teacher, gold = random_batch(seed=0)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(student, teacher, gold, temperature=temperature, alpha=0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("loss_fn", [distill_loss, mse_loss, hard_label_loss])
def test_invalid_alpha_raises(alpha, loss_fn):
    student, teacher, gold = random_batch(seed=0)
    kwargs = {"temperature": 1.0} if loss_fn is distill_loss else {}
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        loss_fn(student, teacher, gold, alpha=alpha, **kwargs)


@pytest.mark.parametrize("loss_fn", [distill_loss, mse_loss, hard_label_loss])
def test_class_count_mismatch_names_both_widths(loss_fn):
    student, _, gold = random_batch(seed=0, num_classes=3)
    _, teacher, _ = random_batch(seed=0, num_classes=5)
    kwargs = {"temperature": 1.0} if loss_fn is distill_loss else {}
    with pytest.raises(ValueError, match="3 classes.*5"):
        loss_fn(student, teacher, gold, alpha=0.5, **kwargs)


def test_gold_shape_mismatch_raises():
    student, teacher, gold = random_batch(seed=0)
    with pytest.raises(ValueError, match="gold_labels"):
        distill_loss(student, teacher, gold[:-1], temperature=1.0, alpha=0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_mse_loss_matches_torch(alpha):
    student, teacher, gold = random_batch(seed=5)
    gold[::3] = -100
    labelled = gold != -100
    expected = alpha * ((student - teacher) ** 2).mean() + (1 - alpha) * F.cross_entropy(
        student[labelled], gold[labelled]
    )
    torch.testing.assert_close(mse_loss(student, teacher, gold, alpha=alpha), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_hard_label_loss_matches_torch(alpha):
    student, teacher, gold = random_batch(seed=6)
    gold[::3] = -100
    labelled = gold != -100
    expected = alpha * F.cross_entropy(student, teacher.argmax(-1)) + (1 - alpha) * F.cross_entropy(
        student[labelled], gold[labelled]
    )
    torch.testing.assert_close(hard_label_loss(student, teacher, gold, alpha=alpha), expected)


def test_hard_label_loss_ignores_teacher_confidence():
    student, teacher, gold = random_batch(seed=8)
    sharper = teacher * 10  # same argmax
    assert hard_label_loss(student, teacher, gold, alpha=1.0) == hard_label_loss(
        student, sharper, gold, alpha=1.0
    )


def test_combine_single_teacher_is_identity():
    _, teacher, _ = random_batch(seed=0)
    torch.testing.assert_close(combine_teacher_logits([teacher], None), teacher)


def test_combine_equal_weights_is_mean():
    a, b, _ = random_batch(seed=1)
    torch.testing.assert_close(combine_teacher_logits([a, b], None), (a + b) / 2)


def test_combine_weights_are_normalised():
    a, b, _ = random_batch(seed=2)
    expected = 0.75 * a + 0.25 * b
    torch.testing.assert_close(combine_teacher_logits([a, b], [3.0, 1.0]), expected)
    torch.testing.assert_close(combine_teacher_logits([a, b], [0.3, 0.1]), expected)


def test_combine_zero_weight_drops_teacher():
    a, b, _ = random_batch(seed=3)
    torch.testing.assert_close(combine_teacher_logits([a, b], [1.0, 0.0]), a)


@pytest.mark.parametrize(
    "teachers, weights, match",
    [
        ([torch.zeros(4, 3), torch.zeros(4, 5)], None, "5 classes.*3"),
        ([torch.zeros(4, 3), torch.zeros(4, 3)], [1.0], "1 weights for 2 teachers"),
        ([torch.zeros(4, 3), torch.zeros(4, 3)], [1.0, -0.5], ">= 0"),
        ([torch.zeros(4, 3), torch.zeros(4, 3)], [0.0, 0.0], "not all be 0"),
        ([], None, "at least one teacher"),
    ],
)
def test_combine_invalid_inputs_raise(teachers, weights, match):
    with pytest.raises(ValueError, match=match):
        combine_teacher_logits(teachers, weights)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_compute_loss_dispatches(kind):
    student, teacher, gold = random_batch(seed=9)
    kwargs = {"temperature": 2.0} if kind == "kl" else {}
    expected = LOSSES[kind](student, teacher, gold, alpha=0.5, **kwargs)
    torch.testing.assert_close(
        compute_loss(kind, student, teacher, gold, temperature=2.0, alpha=0.5), expected
    )


def test_compute_loss_unknown_kind_lists_allowed():
    student, teacher, gold = random_batch(seed=0)
    with pytest.raises(ValueError, match=r"'cosine'.*\['hard', 'kl', 'mse'\]"):
        compute_loss("cosine", student, teacher, gold, temperature=1.0, alpha=0.5)
