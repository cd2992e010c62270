"""Tests of the wire tensor codec: lossless round trips and precise errors for malformed tensors."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.common.v1 import tensor_pb2
from freshet.tensors import TensorError, from_tensor, to_tensor

_DTYPES = {
    np.float32: tensor_pb2.DTYPE_FLOAT32,
    np.float16: tensor_pb2.DTYPE_FLOAT16,
    np.int8: tensor_pb2.DTYPE_INT8,
    np.int32: tensor_pb2.DTYPE_INT32,
    np.int64: tensor_pb2.DTYPE_INT64,
    np.float64: tensor_pb2.DTYPE_FLOAT64,
}
_SHAPES = [(0,), (5,), (3, 4), (0, 7), (2, 0, 3), (2, 3, 4)]


def _sample(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    values = np.linspace(float(info.min) / 2, float(info.max) / 2, num=int(np.prod(shape)))
    return values.astype(dtype).reshape(shape)


@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(_DTYPES), ids=lambda d: d.__name__)
def test_round_trip_preserves_values_shape_and_dtype(dtype, shape):
    array = _sample(dtype, shape)

    wire = to_tensor(array)
    back = from_tensor(tensor_pb2.Tensor.FromString(wire.SerializeToString()), dtype, len(shape), "x")

    assert wire.dtype == _DTYPES[dtype]
    assert list(wire.shape) == list(shape)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_wire_bytes_are_little_endian_even_for_big_endian_input():
    big = np.array([1, 256, -2], dtype=">i4")

    wire = to_tensor(big)

    assert wire.data == np.array([1, 256, -2], dtype="<i4").tobytes()
    np.testing.assert_array_equal(from_tensor(wire), [1, 256, -2])


def test_non_contiguous_input_is_encoded_in_logical_order():
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T

    np.testing.assert_array_equal(from_tensor(to_tensor(array)), array)


def test_float_specials_survive_the_round_trip():
    array = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)

    back = from_tensor(to_tensor(array))

    assert back.tobytes() == array.tobytes()


def test_float64_round_trips_bit_exactly_including_specials_and_subnormals():
    array = np.array([np.pi, -1e300, 5e-324, np.nan, np.inf, -np.inf, -0.0], dtype=np.float64)

    wire = to_tensor(array)
    back = from_tensor(tensor_pb2.Tensor.FromString(wire.SerializeToString()), np.float64, 1, "values")

    assert wire.dtype == tensor_pb2.DTYPE_FLOAT64
    assert wire.data == array.astype("<f8").tobytes()
    assert back.dtype == np.dtype("<f8")
    assert back.tobytes() == array.tobytes()


def test_big_endian_float64_is_encoded_little_endian():
    big = np.array([1.5, -2.25], dtype=">f8")

    wire = to_tensor(big)

    assert wire.data == np.array([1.5, -2.25], dtype="<f8").tobytes()
    np.testing.assert_array_equal(from_tensor(wire, np.float64), [1.5, -2.25])


def test_decoded_array_is_a_read_only_view():
    back = from_tensor(to_tensor(np.zeros(3, np.float32)))

    assert not back.flags.writeable


def test_zero_dimensional_array_round_trips_as_a_scalar():
    back = from_tensor(to_tensor(np.float32(3.5)))

    assert back.shape == ()
    assert back[()] == np.float32(3.5)


def test_empty_shape_on_the_wire_decodes_to_a_scalar():
    wire = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, data=np.int64(9).tobytes())

    back = from_tensor(wire)

    assert back.shape == ()
    assert back[()] == 9


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.bool_, np.complex64])
def test_unsupported_dtype_is_refused_on_encode(dtype):
    with pytest.raises(TensorError, match="unsupported dtype"):
        to_tensor(np.zeros(2, dtype=dtype))


def test_wrong_dtype_raises_tensor_error_naming_the_tensor():
    wire = to_tensor(np.zeros(3, np.float32))

    with pytest.raises(TensorError, match=r"^fids: expected dtype DTYPE_INT64, got DTYPE_FLOAT32$"):
        from_tensor(wire, np.int64, 1, "fids")


def test_wrong_rank_raises_tensor_error_naming_the_tensor():
    wire = to_tensor(np.zeros((2, 3), np.float32))

    with pytest.raises(TensorError, match=r"^grads: expected 1 dimensions, got shape \[2, 3\]$"):
        from_tensor(wire, np.float32, 1, "grads")


@pytest.mark.parametrize("n_bytes", [0, 11, 13])
def test_byte_length_not_matching_shape_raises_tensor_error_naming_the_tensor(n_bytes):
    wire = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3], data=b"\0" * n_bytes)

    with pytest.raises(TensorError, match=rf"^scores: shape \[3\] needs 12 bytes, got {n_bytes}$"):
        from_tensor(wire, name="scores")


@pytest.mark.parametrize("dtype", [tensor_pb2.DTYPE_UNSPECIFIED, 99])
def test_unknown_wire_dtype_raises_tensor_error_naming_the_tensor(dtype):
    wire = tensor_pb2.Tensor(dtype=dtype, shape=[1], data=b"\0")

    with pytest.raises(TensorError, match=rf"^item_ids: unknown dtype {dtype}$"):
        from_tensor(wire, name="item_ids")


def test_negative_dimension_raises_tensor_error_naming_the_tensor():
    wire = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT8, shape=[-2, -3], data=b"\0" * 6)

    with pytest.raises(TensorError, match=r"^x: negative dimension in shape \[-2, -3\]$"):
        from_tensor(wire, name="x")


def test_shape_whose_element_count_overflows_raises_tensor_error():
    wire = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2**32, 2**32], data=b"")

    with pytest.raises(TensorError, match="^grads: "):
        from_tensor(wire, np.float32, 2, "grads")
