"""Tests of the factorization machine: torch training forward, its gradients, and the numpy serving path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freshet.fm import FactorizationMachine, FMConfig, fm_logits, segment_ids, sigmoid


def _batch(rng: np.random.Generator, lengths: list[int], n_fids: int = 12):
    """A lengths + values batch over ``n_fids`` distinct fids: (unique, inverse, segments, per-sample fid lists)."""
    fids = rng.integers(0, n_fids, size=sum(lengths)).astype(np.int64) * 1_000_003
    unique, inverse = np.unique(fids, return_inverse=True)
    segments = segment_ids(np.array(lengths, np.int32))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    samples = [inverse[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]
    return unique, inverse, segments, samples


def _brute_force(rows: torch.Tensor, samples: list[list[int]], bias: torch.Tensor) -> torch.Tensor:
    """bias + sum_i w_i + sum_{i<j} <v_i, v_j> over each sample's fid occurrences, pair by pair."""
    out = []
    for occ in samples:
        logit = bias.reshape(()).to(rows.dtype)
        for a in range(len(occ)):
            logit = logit + rows[occ[a], 0]
            for b in range(a + 1, len(occ)):
                logit = logit + torch.dot(rows[occ[a], 1:], rows[occ[b], 1:])
        out.append(logit)
    return torch.stack(out)


def _model(factors: int, bias: float, dtype=torch.float32) -> FactorizationMachine:
    model = FactorizationMachine(FMConfig(factors))
    with torch.no_grad():
        model.bias.fill_(bias)
    return model.to(dtype)


def test_segment_ids_give_the_sample_of_every_fid_occurrence():
    np.testing.assert_array_equal(segment_ids(np.array([2, 0, 3, 1])), [0, 0, 2, 2, 2, 3])
    assert segment_ids(np.array([], np.int32)).shape == (0,)


def test_row_dim_is_one_linear_weight_plus_the_factors():
    assert FMConfig(8).row_dim == 9
    assert FMConfig(0).row_dim == 1


def test_forward_equals_brute_force_pairwise_fm_for_variable_length_samples():
    rng = np.random.default_rng(0)
    lengths = [3, 1, 0, 5, 2, 7]  # includes an empty sample and repeated fids within a sample
    unique, inverse, segments, samples = _batch(rng, lengths)
    model = _model(factors=4, bias=0.25)
    rows = torch.from_numpy(rng.normal(size=(len(unique), 5)).astype(np.float32))

    logits = model(rows, torch.from_numpy(inverse), torch.from_numpy(segments), len(lengths))

    assert logits.shape == (len(lengths),) and logits.dtype == torch.float32
    expected = _brute_force(rows.double(), samples, model.bias.detach().double())
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert logits[2].item() == pytest.approx(0.25)  # no fids: only the bias


def test_gradients_wrt_rows_and_bias_match_the_brute_force_reference_in_float64():
    rng = np.random.default_rng(1)
    lengths = [4, 2, 6, 1, 3]
    unique, inverse, segments, samples = _batch(rng, lengths)
    model = _model(factors=3, bias=-0.1, dtype=torch.float64)
    weights = torch.from_numpy(rng.normal(size=len(lengths)))
    base = torch.from_numpy(rng.normal(size=(len(unique), 4)))

    rows = base.clone().requires_grad_(True)
    (model(rows, torch.from_numpy(inverse), torch.from_numpy(segments), len(lengths)) * weights).sum().backward()
    ref_rows = base.clone().requires_grad_(True)
    ref_bias = model.bias.detach().clone().requires_grad_(True)
    (_brute_force(ref_rows, samples, ref_bias) * weights).sum().backward()

    torch.testing.assert_close(rows.grad, ref_rows.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.bias.grad, ref_bias.grad, rtol=1e-10, atol=1e-10)


def test_forward_passes_gradcheck_wrt_rows():
    rng = np.random.default_rng(2)
    lengths = [3, 0, 4, 2]
    unique, inverse, segments, _ = _batch(rng, lengths, n_fids=6)
    model = _model(factors=2, bias=0.3, dtype=torch.float64)
    rows = torch.from_numpy(rng.normal(size=(len(unique), 3))).requires_grad_(True)
    inv, seg = torch.from_numpy(inverse), torch.from_numpy(segments)

    assert torch.autograd.gradcheck(lambda r: model(r, inv, seg, len(lengths)), (rows,))


def test_numpy_serving_logits_equal_the_torch_forward_for_fixed_width_examples():
    rng = np.random.default_rng(3)
    n, width, factors = 7, 5, 8
    table = rng.normal(scale=0.5, size=(20, 1 + factors)).astype(np.float32)
    idx = rng.integers(0, 20, size=(n, width))
    bias = 0.4

    served = fm_logits(table[idx], bias)

    unique, inverse = np.unique(idx.reshape(-1), return_inverse=True)
    segments = segment_ids(np.full(n, width, np.int32))
    trained = _model(factors, bias)(
        torch.from_numpy(table[unique]), torch.from_numpy(inverse.astype(np.int64)), torch.from_numpy(segments), n
    )
    assert served.dtype == np.float32 and served.shape == (n,)
    np.testing.assert_allclose(served, trained.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_zero_factors_reduce_the_fm_to_logistic_regression():
    rng = np.random.default_rng(4)
    lengths = [2, 5, 1, 0]
    unique, inverse, segments, samples = _batch(rng, lengths)
    w = rng.normal(size=(len(unique), 1)).astype(np.float32)

    logits = _model(0, 0.5)(torch.from_numpy(w), torch.from_numpy(inverse), torch.from_numpy(segments), 4)

    expected = [0.5 + sum(float(w[i, 0]) for i in occ) for occ in samples]
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    rows = w[rng.integers(0, len(unique), size=(3, 4))]  # [3, 4, 1]
    np.testing.assert_allclose(fm_logits(rows, 0.5), 0.5 + rows[:, :, 0].sum(axis=1), rtol=1e-6)


def test_sigmoid_is_half_at_zero_and_saturates_without_overflow():
    with np.errstate(all="raise"):
        out = sigmoid(np.array([0.0, 1e6, -1e6, 2.0]))
    assert out.dtype == np.float32
    assert out[0] == 0.5
    assert out[1] == pytest.approx(1.0) and out[2] == pytest.approx(0.0, abs=1e-20)
    assert out[3] == pytest.approx(1 / (1 + np.exp(-2.0)))
