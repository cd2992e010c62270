"""Tests of admission: count-min sketch bounds and persistence, count and probabilistic admission."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.admission import (
    AlwaysAdmit,
    CountAdmission,
    CountAdmissionConfig,
    CountMinSketch,
    ProbabilisticAdmission,
    ProbabilisticAdmissionConfig,
    make_admission,
)

_WIDE = CountAdmissionConfig(min_count=3, sketch_width=1 << 16, sketch_depth=4)


# -- the sketch --------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    calls=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 40), max_size=30), max_size=8),
    width=st.sampled_from([1, 7, 64]),
    depth=st.integers(1, 4),
    seed=st.integers(0, 2**64 - 1),
)
def test_sketch_never_under_counts(calls, width, depth, seed):
    # Narrow sketches force collisions: the estimate may grow past the truth, never fall below it.
    sketch = CountMinSketch(width=width, depth=depth, seed=seed)
    exact: Counter[int] = Counter()
    for call in calls:
        after_each = sketch.add(np.array(call, np.int64))
        for fid, estimate in zip(call, after_each.tolist(), strict=True):
            exact[fid] += 1
            # The estimate returned for an occurrence already counts it and every earlier one.
            assert estimate >= exact[fid]
    if exact:
        fids = list(exact)
        estimates = sketch.estimate(np.array(fids, np.int64)).tolist()
        assert all(e >= exact[f] for f, e in zip(fids, estimates, strict=True))


@settings(max_examples=100, deadline=None)
@given(fids=st.lists(st.integers(0, 1000), max_size=40), counts=st.lists(st.integers(0, 5000), min_size=40))
def test_sketch_with_weighted_counts_never_under_counts(fids, counts):
    sketch = CountMinSketch(width=16, depth=2, seed=1)
    counts = counts[: len(fids)]
    sketch.add(np.array(fids, np.int64), np.array(counts, np.int64))
    exact: Counter[int] = Counter()
    for fid, c in zip(fids, counts, strict=True):
        exact[fid] += c
    if exact:
        est = sketch.estimate(np.array(list(exact), np.int64))
        assert (est >= np.minimum(np.array(list(exact.values())), sketch.max_count)).all()


def test_sketch_over_count_is_bounded_on_a_zipf_stream():
    rng = np.random.default_rng(0)
    stream = (rng.zipf(1.2, size=1_000_000) * 1_000_003 + 17).astype(np.int64)
    width, depth = 1 << 14, 4
    sketch = CountMinSketch(width=width, depth=depth, seed=3, counter_bits=32)
    for start in range(0, len(stream), 65_536):
        sketch.add(stream[start : start + 65_536])
    fids, truth = np.unique(stream, return_counts=True)
    over = sketch.estimate(fids).astype(np.int64) - truth
    assert sketch.total == len(stream)
    assert over.min() >= 0
    # Count-min's guarantee: over-count <= e * N / width except with probability exp(-depth) per fid.
    bound = math.e * len(stream) / width
    assert (over > bound).mean() <= math.exp(-depth)
    # Conservative update does much better than the worst case on most fids.
    assert np.median(over) <= bound / 10


def test_sketch_counts_duplicates_within_one_call_in_order():
    sketch = CountMinSketch(width=1 << 12)
    np.testing.assert_array_equal(sketch.add(np.array([5, 9, 5, 5, 9], np.int64)), [1, 1, 2, 3, 2])
    np.testing.assert_array_equal(sketch.estimate(np.array([5, 9, 11], np.int64)), [3, 2, 0])


def test_sketch_counters_saturate_instead_of_wrapping():
    for bits in (16, 32):
        sketch = CountMinSketch(width=64, depth=2, counter_bits=bits)
        big = np.array([2**40], np.int64)
        assert sketch.add(np.array([1], np.int64), big)[0] == 2**bits - 1
        assert sketch.add(np.array([1], np.int64))[0] == 2**bits - 1
        assert sketch.estimate(np.array([1], np.int64))[0] == 2**bits - 1


def test_sketch_memory_is_counter_bytes_times_width_times_depth():
    assert CountMinSketch().nbytes == 2 * (1 << 20) * 4
    assert CountMinSketch(width=1000, depth=3, counter_bits=32).nbytes == 4 * 1000 * 3


def test_sketch_rejects_bad_shapes_and_inputs():
    with pytest.raises(ValueError, match="width"):
        CountMinSketch(width=0)
    with pytest.raises(ValueError, match="depth"):
        CountMinSketch(depth=17)
    with pytest.raises(ValueError, match="counter_bits"):
        CountMinSketch(counter_bits=8)
    sketch = CountMinSketch(width=64)
    with pytest.raises(ValueError, match="integer"):
        sketch.add(np.array([1.5]))
    with pytest.raises(ValueError, match="counts"):
        sketch.add(np.array([1, 2], np.int64), np.array([1, -1]))


def test_sketch_on_an_empty_batch_returns_an_empty_array():
    sketch = CountMinSketch(width=64)
    assert sketch.add(np.array([], np.int64)).shape == (0,)
    assert sketch.estimate(np.array([], np.int64)).shape == (0,)


def test_sketch_bytes_round_trip_keeps_estimates_and_future_counts():
    rng = np.random.default_rng(2)
    sketch = CountMinSketch(width=1 << 10, depth=3, seed=99, counter_bits=32)
    sketch.add(rng.integers(0, 5000, 20_000))
    restored = CountMinSketch.from_bytes(sketch.to_bytes())
    probe = np.arange(5000, dtype=np.int64)
    np.testing.assert_array_equal(restored.estimate(probe), sketch.estimate(probe))
    assert (restored.width, restored.depth, restored.seed, restored.total) == (1 << 10, 3, 99, 20_000)
    more = rng.integers(0, 5000, 1000)
    np.testing.assert_array_equal(restored.add(more), sketch.add(more))


def _corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return {
        "empty": b"",
        "truncated": data[: len(data) - 10],
        "bit flip": bytes(flipped),
        "bad magic": b"XXXX" + data[4:],
        "trailing": data + b"\x00",
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "bit flip", "bad magic", "trailing"])
def test_corrupt_sketch_bytes_raise_value_error(kind):
    sketch = CountMinSketch(width=256, depth=2)
    sketch.add(np.arange(100, dtype=np.int64))
    with pytest.raises(ValueError, match="count-min sketch"):
        CountMinSketch.from_bytes(_corruptions(sketch.to_bytes())[kind])


# -- count admission ---------------------------------------------------------------------------------------


def test_count_admission_admits_exactly_at_the_min_count_th_occurrence():
    admission = make_admission(_WIDE)
    fids = np.arange(1000, 1200, dtype=np.int64) * 7919
    rng = np.random.default_rng(4)
    for occurrence in range(1, 6):
        batch = rng.permutation(fids)
        admitted = admission.admit(batch)
        assert admitted.all() == (occurrence >= 3)
        assert admitted.any() == (occurrence >= 3)


def test_count_admission_counts_duplicates_within_one_call():
    admission = make_admission(_WIDE)
    np.testing.assert_array_equal(
        admission.admit(np.array([42, 42, 7, 42, 42], np.int64)), [False, False, False, True, True]
    )
    np.testing.assert_array_equal(admission.admit(np.array([7, 7], np.int64)), [False, True])


def test_count_admission_with_min_count_one_admits_on_first_sight():
    admission = make_admission(CountAdmissionConfig(min_count=1, sketch_width=1024))
    assert admission.admit(np.array([1, 2, 3], np.int64)).all()


def test_count_admission_state_round_trip_restores_identical_behaviour():
    rng = np.random.default_rng(8)
    cfg = CountAdmissionConfig(min_count=4, sketch_width=1 << 12, sketch_depth=3)
    original = make_admission(cfg)
    original.admit(rng.integers(0, 3000, 10_000))
    restored = make_admission(cfg)
    restored.load_state(original.state_bytes())
    for _ in range(3):
        batch = rng.integers(0, 3000, 2_000)
        np.testing.assert_array_equal(restored.admit(batch), original.admit(batch))


def test_count_admission_refuses_a_sketch_of_another_shape():
    small = make_admission(CountAdmissionConfig(sketch_width=1024))
    big = make_admission(CountAdmissionConfig(sketch_width=2048))
    with pytest.raises(ValueError, match="configured"):
        big.load_state(small.state_bytes())


@pytest.mark.parametrize("kind", ["empty", "truncated", "bit flip", "bad magic", "trailing"])
def test_count_admission_rejects_corrupt_state(kind):
    admission = make_admission(CountAdmissionConfig(sketch_width=512))
    admission.admit(np.arange(50, dtype=np.int64))
    with pytest.raises(ValueError, match="count-min sketch"):
        admission.load_state(_corruptions(admission.state_bytes())[kind])


@pytest.mark.parametrize("min_count", [0, 65536])
def test_count_admission_config_rejects_min_count_the_sketch_cannot_count_to(min_count):
    with pytest.raises(ValueError, match="min_count"):
        CountAdmissionConfig(min_count=min_count)


# -- probabilistic and always ------------------------------------------------------------------------------


def test_probabilistic_admission_rate_is_p_within_three_sigma():
    p, n = 0.1, 100_000
    admission = make_admission(ProbabilisticAdmissionConfig(probability=p, seed=11))
    admitted = sum(
        int(admission.admit(np.arange(i, i + 10_000, dtype=np.int64)).sum()) for i in range(0, n, 10_000)
    )
    assert abs(admitted - n * p) <= 3 * math.sqrt(n * p * (1 - p))


def test_probabilistic_admission_is_reproducible_for_the_same_seed_and_calls():
    fids = np.arange(5000, dtype=np.int64)
    a = make_admission(ProbabilisticAdmissionConfig(probability=0.3, seed=5))
    b = make_admission(ProbabilisticAdmissionConfig(probability=0.3, seed=5))
    other = make_admission(ProbabilisticAdmissionConfig(probability=0.3, seed=6))
    for _ in range(3):
        first = a.admit(fids)
        np.testing.assert_array_equal(first, b.admit(fids))
    assert not np.array_equal(a.admit(fids), other.admit(fids))


def test_probabilistic_admission_state_round_trip_continues_the_same_sequence():
    cfg = ProbabilisticAdmissionConfig(probability=0.5, seed=9)
    original = make_admission(cfg)
    original.admit(np.arange(777, dtype=np.int64))
    restored = make_admission(ProbabilisticAdmissionConfig(probability=0.5, seed=0))
    restored.load_state(original.state_bytes())
    for size in (10, 1000, 3):
        fids = np.arange(size, dtype=np.int64)
        np.testing.assert_array_equal(restored.admit(fids), original.admit(fids))


@pytest.mark.parametrize("kind", ["empty", "truncated", "bit flip", "bad magic", "trailing"])
def test_probabilistic_admission_rejects_corrupt_state(kind):
    admission = make_admission(ProbabilisticAdmissionConfig())
    with pytest.raises(ValueError, match="probabilistic admission"):
        admission.load_state(_corruptions(admission.state_bytes())[kind])


def test_probabilistic_admission_config_rejects_probability_outside_unit_interval():
    with pytest.raises(ValueError, match="probability"):
        ProbabilisticAdmissionConfig(probability=1.5)


def test_probability_extremes_admit_nothing_or_everything():
    fids = np.arange(1000, dtype=np.int64)
    assert not make_admission(ProbabilisticAdmissionConfig(probability=0.0)).admit(fids).any()
    assert make_admission(ProbabilisticAdmissionConfig(probability=1.0)).admit(fids).all()


def test_state_of_one_kind_of_filter_is_refused_by_another():
    count = make_admission(CountAdmissionConfig(sketch_width=256))
    prob = make_admission(ProbabilisticAdmissionConfig())
    always = make_admission(None)
    with pytest.raises(ValueError, match="probabilistic admission"):
        prob.load_state(count.state_bytes())
    with pytest.raises(ValueError, match="count-min sketch"):
        count.load_state(prob.state_bytes())
    with pytest.raises(ValueError, match="always-admit"):
        always.load_state(count.state_bytes())


def test_always_admit_admits_every_occurrence_and_round_trips_its_state():
    always = make_admission(None)
    assert isinstance(always, AlwaysAdmit)
    assert always.admit(np.array([3, 3, 4], np.int64)).tolist() == [True, True, True]
    always.load_state(always.state_bytes())


def test_make_admission_picks_the_filter_for_the_config():
    assert isinstance(make_admission(CountAdmissionConfig(sketch_width=64)), CountAdmission)
    assert isinstance(make_admission(ProbabilisticAdmissionConfig()), ProbabilisticAdmission)
    with pytest.raises(TypeError, match="not an admission config"):
        make_admission("count")  # type: ignore[arg-type]
