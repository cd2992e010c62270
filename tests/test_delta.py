"""Tests of model deltas: proto round trip, checksum verification and decode errors."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.delta import Delta, DeltaError, checksum, decision_subject, decode_delta, delta_subject
from freshet.model.v1 import model_pb2


def _delta(dense: dict[str, np.ndarray] | None = None) -> Delta:
    rng = np.random.default_rng(0)
    return Delta(
        model="fm",
        table="fm",
        shard=2,
        sequence=7,
        base_version=100,
        new_version=130,
        fids=np.array([3, 2**40 + 1, 99, 12], np.int64),
        values=rng.normal(size=(4, 9)).astype(np.float32),
        dense=dense
        if dense is not None
        else {"bias": np.array([0.25], np.float32), "w": np.eye(2, dtype=np.float32)},
        dense_step=11,
        created_ms=1_700_000_000_000,
    )


def test_subjects_follow_the_model_name():
    assert delta_subject("fm") == "model.fm.delta.0"
    assert delta_subject("fm", 3) == "model.fm.delta.3"
    assert decision_subject("fm") == "model.fm.decision"


def test_delta_round_trips_through_the_wire_with_rows_and_dense():
    delta = _delta()

    back = decode_delta(delta.to_proto().SerializeToString())

    for name in ("model", "table", "shard", "sequence", "base_version", "new_version", "dense_step", "created_ms"):
        assert getattr(back, name) == getattr(delta, name), name
    np.testing.assert_array_equal(back.fids, delta.fids)
    np.testing.assert_array_equal(back.values, delta.values)
    assert back.fids.dtype == np.int64 and back.values.dtype == np.float32
    assert sorted(back.dense) == ["bias", "w"]
    for name, value in delta.dense.items():
        np.testing.assert_array_equal(back.dense[name], value)


def test_delta_without_rows_or_dense_round_trips():
    empty = Delta("fm", "fm", 0, 1, 0, 0, np.zeros(0, np.int64), np.zeros((0, 9), np.float32), dense={})
    back = decode_delta(empty.to_proto().SerializeToString())
    assert back.fids.shape == (0,) and back.values.shape == (0, 9) and back.dense == {}


def test_checksum_does_not_depend_on_dense_insertion_order():
    a = _delta({"a": np.ones(2, np.float32), "b": np.zeros(3, np.float32)}).to_proto()
    b = _delta({"b": np.zeros(3, np.float32), "a": np.ones(2, np.float32)}).to_proto()
    assert a.checksum == b.checksum == checksum(a)


def test_a_flipped_byte_in_values_fails_the_checksum():
    delta = _delta()
    raw = bytearray(delta.to_proto().SerializeToString())
    at = bytes(raw).find(delta.values.tobytes())
    assert at >= 0
    raw[at + 17] ^= 0x40

    with pytest.raises(DeltaError, match="checksum"):
        decode_delta(bytes(raw))


def test_a_changed_dense_tensor_fails_the_checksum():
    msg = _delta().to_proto()
    msg.dense["bias"].data = np.array([9.0], np.float32).tobytes()
    with pytest.raises(DeltaError, match="checksum"):
        decode_delta(msg.SerializeToString())


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"garbage", b"\x3a\x10short"])
def test_undecodable_bytes_raise_delta_error(data):
    with pytest.raises(DeltaError, match="cannot decode ModelDelta"):
        decode_delta(data)


def test_rows_and_fids_of_different_lengths_are_rejected():
    bad = Delta("fm", "fm", 0, 1, 0, 2, np.array([1, 2, 3], np.int64), np.zeros((2, 9), np.float32))
    with pytest.raises(DeltaError, match="3 fids but 2 value rows"):
        decode_delta(bad.to_proto().SerializeToString())


def test_fids_with_the_wrong_dtype_are_rejected_even_with_a_valid_checksum():
    bad = Delta("fm", "fm", 0, 1, 0, 2, np.array([1, 2], np.int32), np.zeros((2, 9), np.float32))
    with pytest.raises(DeltaError, match="fids: expected dtype DTYPE_INT64"):
        decode_delta(bad.to_proto().SerializeToString())


def test_an_empty_message_decodes_only_because_its_checksum_of_nothing_is_zero():
    # The zero-byte message is a valid ModelDelta with unset tensors; unset tensors have an
    # unknown dtype, which decode_delta must still refuse.
    msg = model_pb2.ModelDelta()
    assert checksum(msg) == 0
    with pytest.raises(DeltaError, match="unknown dtype"):
        decode_delta(b"")


@pytest.mark.parametrize(("encoding", "bound"), [("fp32", 0.0), ("fp16", 1e-3), ("int8", 0.5 / 127)])
def test_quantised_rows_decode_within_their_encodings_error(encoding: str, bound: float):
    rng = np.random.default_rng(8)
    values = rng.normal(scale=0.5, size=(40, 9)).astype(np.float32)
    values[3] = 0.0  # an all-zero row keeps a usable scale
    delta = Delta("m", "fm", 0, 1, 0, 40, np.arange(40, dtype=np.int64), values, encoding=encoding)
    wire = delta.to_proto()
    decoded = decode_delta(wire.SerializeToString())
    assert decoded.encoding == encoding and decoded.values.dtype == np.float32
    row_max = np.abs(values).max(axis=1, keepdims=True)
    assert np.all(np.abs(decoded.values - values) <= bound * np.maximum(row_max, 1e-12) + 1e-7)
    np.testing.assert_array_equal(decoded.values[3], 0.0)
    sizes = {"fp32": 4, "fp16": 2, "int8": 1}
    assert len(wire.values.data) == values.size * sizes[encoding]


def test_int8_rows_without_scales_are_rejected():
    delta = Delta(
        "m", "fm", 0, 1, 0, 2, np.arange(2, dtype=np.int64), np.ones((2, 3), np.float32), encoding="int8"
    )
    msg = delta.to_proto()
    msg.ClearField("scales")
    msg.checksum = checksum(msg)
    with pytest.raises(DeltaError, match="int8 values need one float32 scale per row"):
        decode_delta(msg.SerializeToString())


def test_an_unknown_encoding_is_a_clear_error():
    with pytest.raises(ValueError, match="encoding must be one of"):
        Delta(
            "m", "fm", 0, 1, 0, 1, np.arange(1, dtype=np.int64), np.ones((1, 2), np.float32), encoding="bf16"
        ).to_proto()
