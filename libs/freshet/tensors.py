"""Conversion between numpy arrays and the wire ``Tensor`` (raw little-endian bytes + shape + dtype)."""

from __future__ import annotations

import math

import numpy as np

from freshet.common.v1 import tensor_pb2

_TO_WIRE = {
    np.dtype("<f4"): tensor_pb2.DTYPE_FLOAT32,
    np.dtype("<f2"): tensor_pb2.DTYPE_FLOAT16,
    np.dtype("i1"): tensor_pb2.DTYPE_INT8,
    np.dtype("<i4"): tensor_pb2.DTYPE_INT32,
    np.dtype("<i8"): tensor_pb2.DTYPE_INT64,
    np.dtype("<f8"): tensor_pb2.DTYPE_FLOAT64,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}


class TensorError(ValueError):
    """A wire tensor is malformed or has an unexpected dtype/shape."""


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encodes an array; dtypes are normalised to little-endian."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _TO_WIRE:
        raise TensorError(f"unsupported dtype {array.dtype}")
    array = np.asarray(array, dtype=dtype, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    return tensor_pb2.Tensor(dtype=_TO_WIRE[dtype], shape=list(array.shape), data=array.tobytes())


def from_tensor(
    tensor: tensor_pb2.Tensor,
    expect_dtype: np.dtype | str | None = None,
    expect_ndim: int | None = None,
    name: str = "tensor",
) -> np.ndarray:
    """Decodes a wire tensor (a read-only view on its bytes), checking dtype, rank and size.

    Raises:
        TensorError: unknown dtype, wrong dtype/rank, or byte length not matching the shape.
    """
    if tensor.dtype not in _FROM_WIRE:
        raise TensorError(f"{name}: unknown dtype {tensor.dtype}")
    dtype = _FROM_WIRE[tensor.dtype]
    if expect_dtype is not None and dtype != np.dtype(expect_dtype):
        want = tensor_pb2.DType.Name(_TO_WIRE[np.dtype(expect_dtype)])
        raise TensorError(f"{name}: expected dtype {want}, got {tensor_pb2.DType.Name(tensor.dtype)}")
    shape = tuple(tensor.shape)
    if expect_ndim is not None and len(shape) != expect_ndim:
        raise TensorError(f"{name}: expected {expect_ndim} dimensions, got shape {list(shape)}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{name}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to a small count
    data = tensor.data
    if count * dtype.itemsize != len(data):
        raise TensorError(f"{name}: shape {list(shape)} needs {count * dtype.itemsize} bytes, got {len(data)}")
    array = np.frombuffer(data, dtype=dtype)
    return array if len(shape) == 1 else array.reshape(shape)  # 1-D (the common case) needs no reshape
