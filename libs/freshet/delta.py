"""Model deltas: building, checksumming and decoding ``ModelDelta`` messages."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from freshet.model.v1 import model_pb2
from freshet.tensors import from_tensor, to_tensor

# The shard number of dense-parameter deltas and of a snapshot's dense chunk.
DENSE_SHARD = -1


def delta_subject(model: str, shard: int = 0) -> str:
    """Subject of one store shard's deltas: ``model.<model>.delta.<shard>`` (``dense_subject`` for shard -1)."""
    if shard == DENSE_SHARD:
        return dense_subject(model)
    return f"model.{model}.delta.{shard}"


def dense_subject(model: str) -> str:
    """Subject of the dense-parameter deltas (shard ``DENSE_SHARD``): ``model.<model>.delta.dense``."""
    return f"model.{model}.delta.dense"


def decision_subject(model: str) -> str:
    return f"model.{model}.decision"


ENCODINGS = ("fp32", "fp16", "int8")


def quantize(values: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows float32 [n, dim] as sent: fp32 as is, fp16, or int8 with a per-row scale (returned second).

    int8 rows are ``round(v / scale)`` with ``scale = max|row| / 127`` (1 for an all-zero row), so the
    error of each value is at most ``scale / 2``.
    """
    if encoding == "fp32":
        return np.asarray(values, np.float32), None
    if encoding == "fp16":
        return np.asarray(values, np.float16), None
    if encoding == "int8":
        scales = np.abs(values).max(axis=1).astype(np.float32) / 127.0 if len(values) else np.zeros(0, np.float32)
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(values / scales[:, None]), -127, 127).astype(np.int8)
        return q, scales
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def dequantize(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """float32 rows of ``quantize``'s output."""
    if values.dtype == np.int8:
        return values.astype(np.float32) * scales[:, None]
    return values.astype(np.float32, copy=False)


def checksum(delta: model_pb2.ModelDelta) -> int:
    """crc32 of the whole message with ``checksum`` cleared: rows, dense, shapes and header fields.

    The field is cleared in place and restored, rather than on a copy of a delta of up to 1 MB.
    """
    saved = delta.checksum
    delta.checksum = 0
    try:
        return zlib.crc32(delta.SerializeToString(deterministic=True))
    finally:
        delta.checksum = saved


@dataclass(frozen=True)
class Delta:
    """A decoded delta: rows to overwrite and, optionally, new dense parameters."""

    model: str
    table: str
    shard: int
    sequence: int
    base_version: int
    new_version: int
    fids: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n, dim]
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    dense_step: int = 0
    created_ms: int = 0
    encoding: str = "fp32"  # how rows travel (``quantize``); decoded deltas hold float32 values
    checksum: int = 0  # the message's crc32 when decoded (``decode_delta``); ``to_proto`` computes its own

    def to_proto(self) -> model_pb2.ModelDelta:
        values, scales = quantize(self.values, self.encoding)
        msg = model_pb2.ModelDelta(
            model=self.model,
            table=self.table,
            shard=self.shard,
            sequence=self.sequence,
            base_version=self.base_version,
            new_version=self.new_version,
            fids=to_tensor(self.fids),
            values=to_tensor(values),
            dense={k: to_tensor(v) for k, v in self.dense.items()},
            dense_step=self.dense_step,
            created_ms=self.created_ms,
        )
        if scales is not None:
            msg.scales.CopyFrom(to_tensor(scales))
        msg.checksum = checksum(msg)
        return msg


class DeltaError(ValueError):
    """A delta failed its checks; the message says which."""


def decode_delta(data: bytes) -> Delta:
    """Parses a delta and verifies its checksum and tensor shapes.

    Raises:
        DeltaError: undecodable bytes, checksum mismatch, or inconsistent tensors.
    """
    try:
        msg = model_pb2.ModelDelta.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise DeltaError(f"cannot decode ModelDelta: {exc}") from None
    if checksum(msg) != msg.checksum:
        raise DeltaError(f"checksum mismatch on delta {msg.model}/{msg.shard}#{msg.sequence}")
    try:
        fids = from_tensor(msg.fids, np.int64, 1, "fids")
        values = from_tensor(msg.values, None, 2, "values")
        if values.dtype not in (np.float32, np.float16, np.int8):
            raise DeltaError(f"values: dtype {values.dtype} is not float32, float16 or int8")
        scales = from_tensor(msg.scales, np.float32, 1, "scales") if msg.HasField("scales") else None
        if values.dtype == np.int8 and (scales is None or len(scales) != len(values)):
            raise DeltaError("int8 values need one float32 scale per row")
        dense = {k: from_tensor(v, np.float32, None, k) for k, v in msg.dense.items()}
    except ValueError as exc:
        raise DeltaError(str(exc)) from None
    if len(values) != len(fids):
        raise DeltaError(f"{len(fids)} fids but {len(values)} value rows")
    encoding = {np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}.get(values.dtype, "fp32")
    values = dequantize(values, scales)
    return Delta(
        model=msg.model,
        table=msg.table,
        shard=msg.shard,
        sequence=msg.sequence,
        base_version=msg.base_version,
        new_version=msg.new_version,
        fids=fids,
        values=values,
        dense=dense,
        dense_step=msg.dense_step,
        created_ms=msg.created_ms,
        encoding=encoding,
        checksum=msg.checksum,
    )
