"""Model deltas: building, checksumming and decoding ``ModelDelta`` messages."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from freshet.model.v1 import model_pb2
from freshet.tensors import from_tensor, to_tensor


def delta_subject(model: str, shard: int = 0) -> str:
    """Subject of one store shard's deltas: ``model.<model>.delta.<shard>``."""
    return f"model.{model}.delta.{shard}"


def decision_subject(model: str) -> str:
    return f"model.{model}.decision"


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

    def to_proto(self) -> model_pb2.ModelDelta:
        msg = model_pb2.ModelDelta(
            model=self.model,
            table=self.table,
            shard=self.shard,
            sequence=self.sequence,
            base_version=self.base_version,
            new_version=self.new_version,
            fids=to_tensor(self.fids),
            values=to_tensor(self.values),
            dense={k: to_tensor(v) for k, v in self.dense.items()},
            dense_step=self.dense_step,
            created_ms=self.created_ms,
        )
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
        values = from_tensor(msg.values, np.float32, 2, "values")
        dense = {k: from_tensor(v, np.float32, None, k) for k, v in msg.dense.items()}
    except ValueError as exc:
        raise DeltaError(str(exc)) from None
    if len(values) != len(fids):
        raise DeltaError(f"{len(fids)} fids but {len(values)} value rows")
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
    )
