"""Tests of the fid layout: slot in the high bits, stable hashing, and train/serve feature parity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from freshet.events.v1 import events_pb2
from freshet.fids import (
    MAX_SLOT,
    SLOT_ITEM,
    SLOT_POSITION,
    SLOT_USER,
    VALUE_MASK,
    batch_example_fids,
    context_slot,
    example_fids,
    hash_value,
    int_fids,
    make_fid,
    slot_of,
)
from freshet.predictor.v1 import predictor_pb2
from freshet.tensors import from_tensor, to_tensor

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(slot=st.integers(0, MAX_SLOT), value_hash=st.integers(-(2**70), 2**70))
def test_make_fid_round_trips_slot_and_low_value_bits(slot, value_hash):
    fid = make_fid(slot, value_hash)

    assert slot_of(fid) == slot
    assert fid & VALUE_MASK == value_hash & VALUE_MASK
    assert 0 <= fid < 2**63


@pytest.mark.parametrize("slot", [-1, MAX_SLOT + 1, 2**20])
def test_make_fid_rejects_out_of_range_slot(slot):
    with pytest.raises(ValueError, match=f"slot {slot} outside"):
        make_fid(slot, 1)


@given(slot=st.integers(0, MAX_SLOT), values=st.lists(_INT64, min_size=1, max_size=50))
def test_int_fids_are_non_negative_and_carry_their_slot(slot, values):
    fids = int_fids(slot, np.array(values, dtype=np.int64))

    assert fids.dtype == np.int64
    assert (fids >= 0).all()
    assert (slot_of(fids) == slot).all()


def test_int_fids_are_deterministic_and_pinned():
    ids = np.array([0, 1, 42], dtype=np.int64)

    first = int_fids(SLOT_ITEM, ids)

    np.testing.assert_array_equal(first, int_fids(SLOT_ITEM, ids.copy()))
    # Fids are persisted in the embedding store: a change to the mixing would orphan every row.
    assert first.tolist() == [747914785574319, 613443887586497, 618089547525781]


def test_int_fids_of_a_million_distinct_ids_do_not_collide():
    ids = np.concatenate([np.arange(500_000), np.arange(2**40, 2**40 + 500_000)]).astype(np.int64)

    fids = int_fids(SLOT_ITEM, ids)

    assert np.unique(fids).size == ids.size


def test_int_fids_of_the_same_id_differ_between_slots():
    ids = np.arange(1000, dtype=np.int64)

    assert not np.intersect1d(int_fids(SLOT_USER, ids), int_fids(SLOT_ITEM, ids)).size


def test_int_fids_rejects_out_of_range_slot():
    with pytest.raises(ValueError, match="slot"):
        int_fids(MAX_SLOT + 1, np.array([1], dtype=np.int64))


def test_hash_value_is_stable_across_processes():
    # Pinned values: hash() would change per process, blake2b must not.
    assert hash_value("abc") == 6455300059550759896
    assert hash_value(7) == 16449184117230192567


def test_hash_value_of_str_equals_hash_of_its_utf8_bytes():
    assert hash_value("größe") == hash_value("größe".encode())


def test_hash_value_distinguishes_an_int_from_its_decimal_string():
    assert hash_value(7) != hash_value("7")


@given(name=st.text(max_size=30))
def test_context_slot_is_above_the_fixed_slots(name):
    assert 64 <= context_slot(name) <= MAX_SLOT


def test_context_slot_is_pinned():
    assert (context_slot("country"), context_slot("device")) == (15373, 27134)


def test_example_fids_columns_are_user_item_position_then_context_by_name():
    items = np.array([10, 11, 12], dtype=np.int64)
    context = {"device": "ios", "country": "de"}

    fids = example_fids(5, items, 2, context)

    assert fids.shape == (3, 5)
    assert fids.dtype == np.int64
    np.testing.assert_array_equal(fids[:, 0], np.full(3, int_fids(SLOT_USER, np.array([5]))[0]))
    np.testing.assert_array_equal(fids[:, 1], int_fids(SLOT_ITEM, items))
    np.testing.assert_array_equal(fids[:, 2], np.full(3, int_fids(SLOT_POSITION, np.array([2]))[0]))
    np.testing.assert_array_equal(fids[:, 3], np.full(3, make_fid(context_slot("country"), hash_value("de"))))
    np.testing.assert_array_equal(fids[:, 4], np.full(3, make_fid(context_slot("device"), hash_value("ios"))))
    assert (fids >= 0).all()


def test_example_fids_without_context_has_three_columns():
    assert example_fids(1, np.array([1, 2]), 0).shape == (2, 3)


def test_example_fids_of_no_items_is_empty_with_all_columns():
    fids = example_fids(1, np.array([], dtype=np.int64), 0, {"a": "b"})

    assert fids.shape == (0, 4)
    assert fids.dtype == np.int64


def test_train_time_and_serve_time_fids_are_identical():
    context = {"country": "de", "device": "ios", "hour": "13"}
    items = [3, 99, 2**40]
    # Training: the joiner turns one impression at a time into one row.
    impressions = [
        events_pb2.Impression(user_id=77, item_id=item, position=4, context=dict(reversed(context.items())))
        for item in items
    ]
    train = np.stack(
        [example_fids(imp.user_id, [imp.item_id], imp.position, dict(imp.context))[0] for imp in impressions]
    )
    # Serving: the predictor scores all candidates of a request at once.
    request = predictor_pb2.PredictRequest(
        user_id=77, item_ids=to_tensor(np.array(items, dtype=np.int64)), position=4, context=context
    )
    serve = example_fids(
        request.user_id, from_tensor(request.item_ids, np.int64, 1), request.position, dict(request.context)
    )

    np.testing.assert_array_equal(train, serve)


def test_batch_example_fids_equal_example_fids_row_by_row():
    rng = np.random.default_rng(3)
    n = 50
    users, items, positions = rng.integers(0, 1 << 40, n), rng.integers(0, 1 << 40, n), rng.integers(0, 20, n)
    contexts = [
        tuple(sorted((f"k{j}", f"v{rng.integers(5)}") for j in rng.choice(4, rng.integers(0, 4), replace=False)))
        for _ in range(n)
    ]
    fids, lengths = batch_example_fids(users, items, positions, contexts)
    assert lengths.tolist() == [3 + len(c) for c in contexts]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(n):
        want = example_fids(int(users[i]), [items[i]], int(positions[i]), dict(contexts[i]))[0]
        np.testing.assert_array_equal(fids[offsets[i] : offsets[i + 1]], want)


def test_batch_example_fids_without_context_is_three_per_example():
    fids, lengths = batch_example_fids(np.array([1, 2]), np.array([3, 4]), np.array([0, 1]), [(), ()])
    assert lengths.tolist() == [3, 3]
    np.testing.assert_array_equal(fids[3:], example_fids(2, [4], 1)[0])
