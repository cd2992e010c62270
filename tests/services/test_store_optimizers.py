"""Tests of the server-side sparse optimizers: float64 reference loops, torch, state layout, errors, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.store.optimizers import (
    Adagrad,
    AdagradConfig,
    Adam,
    AdamConfig,
    FTRLConfig,
    RowwiseAdagrad,
    RowwiseAdagradConfig,
    SGDConfig,
    SparseOptimizer,
    make_optimizer,
    optimizer_from_dict,
    optimizer_to_dict,
)

_DIM = 5
_CONFIGS = [
    SGDConfig(learning_rate=0.1),
    AdagradConfig(learning_rate=0.2, initial_accumulator=0.1, eps=1e-8),
    RowwiseAdagradConfig(learning_rate=0.2, initial_accumulator=0.1, eps=1e-8),
    FTRLConfig(alpha=0.1, beta=1.0, l1=0.05, l2=0.3),
    FTRLConfig(alpha=0.05, beta=1.0),
    AdamConfig(learning_rate=0.01, beta1=0.9, beta2=0.999, eps=1e-8),
]
_CONFIG_IDS = ["sgd", "adagrad", "rowwise_adagrad", "ftrl_l1_l2", "ftrl", "adam"]


# -- references: one row at a time, plain Python floats (float64) ---------------------------------------------
# Each takes a row's value and state as lists and a gradient list, and returns the new (value, state).


def _ref_sgd(cfg: SGDConfig, w: list[float], s: list[float], g: list[float]) -> tuple[list[float], list[float]]:
    return [w[j] - cfg.learning_rate * g[j] for j in range(len(w))], s


def _ref_adagrad(cfg: AdagradConfig, w, s, g):
    acc = [s[j] + g[j] * g[j] for j in range(len(w))]
    return [w[j] - cfg.learning_rate * g[j] / (math.sqrt(acc[j]) + cfg.eps) for j in range(len(w))], acc


def _ref_rowwise(cfg: RowwiseAdagradConfig, w, s, g):
    acc = s[0] + sum(x * x for x in g) / len(g)
    return [w[j] - cfg.learning_rate * g[j] / (math.sqrt(acc) + cfg.eps) for j in range(len(w))], [acc]


def _ftrl_closed_form(cfg: FTRLConfig, z: float, n: float) -> float:
    if abs(z) <= cfg.l1:
        return 0.0
    return -(z - math.copysign(cfg.l1, z)) / ((cfg.beta + math.sqrt(n)) / cfg.alpha + cfg.l2)


def _ref_ftrl(cfg: FTRLConfig, w, s, g):
    dim = len(w)
    z, n = list(s[:dim]), list(s[dim:])
    out = []
    for j in range(dim):
        if n[j] == 0.0 and w[j] != 0.0:
            # The documented choice: a fresh element's z reproduces its current (initial) value.
            z[j] = -(w[j] * (cfg.beta / cfg.alpha + cfg.l2) + math.copysign(cfg.l1, w[j]))
        n_new = n[j] + g[j] * g[j]
        sigma = (math.sqrt(n_new) - math.sqrt(n[j])) / cfg.alpha
        z[j] += g[j] - sigma * w[j]
        n[j] = n_new
        out.append(_ftrl_closed_form(cfg, z[j], n[j]))
    return out, z + n


def _ref_adam(cfg: AdamConfig, w, s, g):
    dim = len(w)
    m, v, t = list(s[:dim]), list(s[dim : 2 * dim]), s[2 * dim] + 1
    out = []
    for j in range(dim):
        m[j] = cfg.beta1 * m[j] + (1 - cfg.beta1) * g[j]
        v[j] = cfg.beta2 * v[j] + (1 - cfg.beta2) * g[j] * g[j]
        m_hat, v_hat = m[j] / (1 - cfg.beta1**t), v[j] / (1 - cfg.beta2**t)
        out.append(w[j] - cfg.learning_rate * m_hat / (math.sqrt(v_hat) + cfg.eps))
    return out, m + v + [t]


def _reference(cfg):
    return {
        SGDConfig: _ref_sgd,
        AdagradConfig: _ref_adagrad,
        RowwiseAdagradConfig: _ref_rowwise,
        FTRLConfig: _ref_ftrl,
        AdamConfig: _ref_adam,
    }[type(cfg)]


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_CONFIG_IDS)
def test_sparse_steps_on_random_row_subsets_match_the_float64_reference(cfg):
    rng = np.random.default_rng(7)
    opt = make_optimizer(cfg)
    n_rows = 6
    values = rng.uniform(-0.05, 0.05, size=(n_rows, _DIM)).astype(np.float32)
    state = opt.init_state(n_rows, _DIM)
    ref_values = values.astype(np.float64).tolist()
    ref_state = state.astype(np.float64).tolist()
    step = _reference(cfg)
    for _ in range(10):
        # Like a Push: only some rows, gathered, updated, scattered back; each row's state moves alone.
        rows = np.sort(rng.choice(n_rows, size=rng.integers(1, n_rows + 1), replace=False))
        grads = rng.normal(size=(len(rows), _DIM)).astype(np.float32)
        v, s = values[rows], state[rows]
        opt.apply(v, s, grads)
        values[rows], state[rows] = v, s
        for k, row in enumerate(rows.tolist()):
            g = [float(x) for x in grads[k]]
            ref_values[row], ref_state[row] = step(cfg, ref_values[row], ref_state[row], g)
    np.testing.assert_allclose(values, np.array(ref_values), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state, np.array(ref_state).reshape(state.shape), rtol=1e-5, atol=1e-6)


def _torch_run(torch_opt_factory, opt: SparseOptimizer, steps: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    init = rng.uniform(-0.05, 0.05, size=(1, _DIM)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(init.copy()))
    torch_opt = torch_opt_factory([param])
    values, state = init.copy(), opt.init_state(1, _DIM)
    for _ in range(steps):
        grad = rng.normal(scale=2.0, size=(1, _DIM)).astype(np.float32)
        param.grad = torch.from_numpy(grad.copy())
        torch_opt.step()
        opt.apply(values, state, grad)
    return values, param.detach().numpy()


def test_sgd_matches_torch_sgd_on_a_dense_row():
    ours, theirs = _torch_run(lambda p: torch.optim.SGD(p, lr=0.1), make_optimizer(SGDConfig(learning_rate=0.1)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_adagrad_matches_torch_adagrad_with_initial_accumulator_and_eps_outside_sqrt():
    cfg = AdagradConfig(learning_rate=0.2, initial_accumulator=0.3, eps=1e-3)
    ours, theirs = _torch_run(
        lambda p: torch.optim.Adagrad(p, lr=0.2, initial_accumulator_value=0.3, eps=1e-3), make_optimizer(cfg)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_adam_matches_torch_adam_on_a_row_updated_every_step():
    cfg = AdamConfig(learning_rate=0.01, beta1=0.8, beta2=0.99, eps=1e-6)
    ours, theirs = _torch_run(
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6), make_optimizer(cfg)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_adam_bias_correction_counts_only_the_rows_own_updates():
    opt = make_optimizer(AdamConfig(learning_rate=0.01))
    values = np.zeros((2, _DIM), np.float32)
    state = opt.init_state(2, _DIM)
    g = np.full((1, _DIM), 0.5, np.float32)
    for _ in range(20):
        v, s = values[:1], state[:1]
        opt.apply(v, s, g)
    late_v, late_s = values[1:].copy(), state[1:].copy()
    opt.apply(late_v, late_s, -g)
    # A fresh row's first bias-corrected step is lr * g / |g|: a full step, not the table's 21st.
    np.testing.assert_allclose(late_v, 0.01, rtol=1e-5)
    assert late_s[0, -1] == 1.0
    assert state[0, -1] == 20.0


@pytest.mark.parametrize(
    ("cfg", "width"),
    [
        (SGDConfig(), 0),
        (AdagradConfig(), _DIM),
        (RowwiseAdagradConfig(), 1),
        (FTRLConfig(), 2 * _DIM),
        (AdamConfig(), 2 * _DIM + 1),
    ],
)
def test_state_width_and_init_state_shape_per_optimizer(cfg, width):
    opt = make_optimizer(cfg)
    assert opt.state_width(_DIM) == width
    state = opt.init_state(3, _DIM)
    assert state.shape == (3, width)
    assert state.dtype == np.float32


def test_adagrad_state_starts_at_the_initial_accumulator_and_others_at_zero():
    np.testing.assert_array_equal(make_optimizer(AdagradConfig(initial_accumulator=0.25)).init_state(2, 3), 0.25)
    np.testing.assert_array_equal(
        make_optimizer(RowwiseAdagradConfig(initial_accumulator=0.5)).init_state(2, 3), 0.5
    )
    np.testing.assert_array_equal(make_optimizer(FTRLConfig()).init_state(2, 3), 0.0)
    np.testing.assert_array_equal(make_optimizer(AdamConfig()).init_state(2, 3), 0.0)


def test_make_optimizer_picks_the_class_for_the_config():
    assert isinstance(make_optimizer(AdagradConfig()), Adagrad)
    assert isinstance(make_optimizer(RowwiseAdagradConfig()), RowwiseAdagrad)
    assert isinstance(make_optimizer(AdamConfig()), Adam)


def test_make_optimizer_rejects_a_non_config():
    with pytest.raises(TypeError, match="not an optimizer config"):
        make_optimizer({"name": "sgd"})  # type: ignore[arg-type]


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_CONFIG_IDS)
def test_optimizer_dict_round_trips(cfg):
    assert optimizer_from_dict(optimizer_to_dict(cfg)) == cfg


def test_optimizer_from_dict_reads_named_settings_and_numeric_strings():
    assert optimizer_from_dict({"name": "adagrad", "learning_rate": 0.1}) == AdagradConfig(learning_rate=0.1)
    assert optimizer_from_dict({"name": "ftrl", "l1": "0.5"}) == FTRLConfig(l1=0.5)
    assert optimizer_from_dict({"name": "rowwise_adagrad"}) == RowwiseAdagradConfig()


@pytest.mark.parametrize(
    ("d", "named"),
    [
        ({"name": "rmsprop"}, "rmsprop"),
        ({"learning_rate": 0.1}, "name"),
        ({"name": "adam", "momentum": 0.9}, "momentum"),
        ({"name": "sgd", "learning_rate": "fast"}, "learning_rate"),
        ({"name": "sgd", "learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_optimizer_from_dict_errors_name_the_offender(d, named):
    with pytest.raises(ValueError, match=named):
        optimizer_from_dict(d)


@pytest.mark.parametrize(
    ("factory", "named"),
    [
        (lambda: SGDConfig(learning_rate=0.0), "learning_rate"),
        (lambda: AdagradConfig(eps=-1.0), "eps"),
        (lambda: AdagradConfig(eps=0.0, initial_accumulator=0.0), "initial_accumulator"),
        (lambda: RowwiseAdagradConfig(initial_accumulator=-0.1), "initial_accumulator"),
        (lambda: FTRLConfig(alpha=0.0), "alpha"),
        (lambda: FTRLConfig(beta=0.0, l2=0.0), "beta"),
        (lambda: FTRLConfig(l1=-1.0), "l1"),
        (lambda: AdamConfig(beta2=1.0), "betas"),
        (lambda: AdamConfig(eps=0.0), "eps"),
    ],
)
def test_invalid_settings_are_rejected_at_construction(factory, named):
    with pytest.raises(ValueError, match=named):
        factory()


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_CONFIG_IDS)
def test_apply_on_zero_rows_is_a_no_op(cfg):
    opt = make_optimizer(cfg)
    values = np.zeros((0, _DIM), np.float32)
    state = opt.init_state(0, _DIM)
    opt.apply(values, state, np.zeros((0, _DIM), np.float32))
    assert values.shape == (0, _DIM)
    assert state.shape == (0, opt.state_width(_DIM))


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_CONFIG_IDS)
def test_values_and_state_stay_finite_under_huge_gradients(cfg):
    opt = make_optimizer(cfg)
    f32_max = np.finfo(np.float32).max
    grads = np.array([[f32_max, -f32_max, 1e30, -1e20, 1e-30]] * 3, np.float32)
    values = np.full((3, _DIM), 0.01, np.float32)
    state = opt.init_state(3, _DIM)
    for _ in range(50):
        opt.apply(values, state, grads)
    opt.apply(values, state, np.ones_like(grads))
    assert np.isfinite(values).all()
    assert np.isfinite(state).all()


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_CONFIG_IDS)
def test_apply_updates_non_contiguous_column_views_in_place(cfg):
    # The tiered table keeps value and state side by side in one slab and passes column slices.
    opt = make_optimizer(cfg)
    rng = np.random.default_rng(1)
    width = opt.state_width(_DIM)
    block = np.concatenate([rng.uniform(-0.1, 0.1, (4, _DIM)), opt.init_state(4, _DIM)], axis=1).astype(np.float32)
    grads = rng.normal(size=(4, _DIM)).astype(np.float32)
    expected_v, expected_s = block[:, :_DIM].copy(), block[:, _DIM:].copy()
    opt.apply(expected_v, expected_s, grads)
    opt.apply(block[:, :_DIM], block[:, _DIM:], grads)
    np.testing.assert_array_equal(block[:, :_DIM], expected_v)
    np.testing.assert_array_equal(block[:, _DIM : _DIM + width], expected_s)


def test_apply_rejects_mismatched_shapes_and_non_float32_rows():
    opt = make_optimizer(AdagradConfig())
    values = np.zeros((2, _DIM), np.float32)
    with pytest.raises(ValueError, match="grads shape"):
        opt.apply(values, opt.init_state(2, _DIM), np.zeros((3, _DIM), np.float32))
    with pytest.raises(ValueError, match="state shape"):
        opt.apply(values, opt.init_state(2, _DIM + 1), np.zeros((2, _DIM), np.float32))
    with pytest.raises(TypeError, match="float32"):
        opt.apply(values.astype(np.float64), opt.init_state(2, _DIM), np.zeros((2, _DIM), np.float32))


def test_float64_gradients_are_accepted():
    opt = make_optimizer(SGDConfig(learning_rate=0.5))
    values = np.ones((1, 2), np.float32)
    opt.apply(values, opt.init_state(1, 2), np.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(values, [[0.5, 1.5]])


def test_ftrl_keeps_the_initial_value_until_a_non_zero_gradient():
    opt = make_optimizer(FTRLConfig(alpha=0.1, beta=1.0, l1=0.01, l2=0.5))
    values = np.array([[0.03, -0.02, 0.0]], np.float32)
    state = opt.init_state(1, 3)
    initial = values.copy()
    opt.apply(values, state, np.zeros((1, 3), np.float32))
    np.testing.assert_allclose(values, initial, rtol=1e-6, atol=1e-9)


def test_ftrl_first_step_moves_from_the_initial_value_by_the_proximal_step():
    cfg = FTRLConfig(alpha=0.1, beta=1.0, l2=0.5)
    opt = make_optimizer(cfg)
    values = np.array([[0.03, -0.02, 0.01]], np.float32)
    g = np.array([[0.5, -2.0, 0.0]], np.float32)
    expected = values - cfg.alpha * g / (cfg.beta + np.abs(g) + cfg.alpha * cfg.l2)
    opt.apply(values, opt.init_state(1, 3), g)
    np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_ftrl_value_is_the_closed_form_of_its_state_after_steps():
    cfg = FTRLConfig(alpha=0.05, beta=0.5, l1=0.3, l2=0.1)
    opt = make_optimizer(cfg)
    rng = np.random.default_rng(5)
    values = rng.uniform(-0.05, 0.05, (8, _DIM)).astype(np.float32)
    state = opt.init_state(8, _DIM)
    for _ in range(6):
        opt.apply(values, state, rng.normal(size=(8, _DIM)).astype(np.float32))
    z, n = state[:, :_DIM].astype(np.float64), state[:, _DIM:].astype(np.float64)
    closed = np.vectorize(lambda zz, nn: _ftrl_closed_form(cfg, zz, nn))(z, n)
    np.testing.assert_allclose(values, closed, rtol=1e-6, atol=1e-9)


def test_ftrl_strong_l1_snaps_elements_pushed_towards_zero_to_exactly_zero():
    opt = make_optimizer(FTRLConfig(alpha=0.05, beta=1.0, l1=100.0))
    values = np.full((4, _DIM), 0.01, np.float32)
    state = opt.init_state(4, _DIM)
    opt.apply(values, state, np.full((4, _DIM), 1.0, np.float32))
    assert (values == 0.0).all()
