"""Training samples in memory and on the wire (``SampleBatch``: lengths + values layout)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from freshet.fids import batch_example_fids
from freshet.samples.v1 import samples_pb2
from freshet.tensors import from_tensor, to_tensor


@dataclass(frozen=True)
class Sample:
    """One labelled example produced by the joiner."""

    sample_id: str
    fids: np.ndarray  # int64 [n_features]
    label: float
    weight: float = 1.0
    event_time_ms: int = 0
    user_id: int = 0
    item_id: int = 0
    label_vector: tuple[float, ...] = ()  # [click, like, share, dwell_seconds]; empty: (label, 0, 0, 0)
    version: int = 1


LABELS = 4


@dataclass(frozen=True)
class SampleArrays:
    """A decoded batch: sample ``i`` owns ``fids[offsets[i]:offsets[i] + lengths[i]]``."""

    fids: np.ndarray  # int64 [T]
    lengths: np.ndarray  # int32 [B]
    labels: np.ndarray  # float32 [B]
    weights: np.ndarray  # float32 [B]
    sample_ids: list[str]
    event_time_ms: np.ndarray  # int64 [B]
    user_ids: np.ndarray  # int64 [B]
    item_ids: np.ndarray  # int64 [B]
    label_vectors: np.ndarray  # float32 [B, 4]
    versions: np.ndarray  # int32 [B]

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def concat(parts: Sequence[SampleArrays]) -> SampleArrays:
        return SampleArrays(
            fids=np.concatenate([p.fids for p in parts]),
            lengths=np.concatenate([p.lengths for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
            sample_ids=[s for p in parts for s in p.sample_ids],
            event_time_ms=np.concatenate([p.event_time_ms for p in parts]),
            user_ids=np.concatenate([p.user_ids for p in parts]),
            item_ids=np.concatenate([p.item_ids for p in parts]),
            label_vectors=np.concatenate([p.label_vectors for p in parts]),
            versions=np.concatenate([p.versions for p in parts]),
        )


def featurise(
    impressions: Sequence,
    contexts: Sequence[Sequence[tuple[str, str]]],
    label_vectors: np.ndarray,
    weights: np.ndarray,
    sample_ids: list[str],
    versions: np.ndarray,
) -> SampleArrays:
    """Training samples of labelled impressions (``featurise_columns`` of their fields).

    ``impressions`` have ``user_id``, ``item_id``, ``position`` and ``event_time_ms`` (the joiner's
    events or ``Impression`` protobufs); ``contexts`` are their (name, value) pairs sorted by name.
    """
    n = len(impressions)
    return featurise_columns(
        *(np.fromiter(map(attrgetter(f), impressions), np.int64, n) for f in ("user_id", "item_id", "position")),
        np.fromiter(map(attrgetter("event_time_ms"), impressions), np.int64, n),
        contexts,
        label_vectors,
        weights,
        sample_ids,
        versions,
    )


def featurise_columns(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    positions: np.ndarray,
    event_time_ms: np.ndarray,
    contexts: Sequence[Sequence[tuple[str, str]]],
    label_vectors: np.ndarray,
    weights: np.ndarray,
    sample_ids: list[str],
    versions: np.ndarray,
) -> SampleArrays:
    """Training samples of labelled impressions given as columns, featurised in one vectorised pass.

    The joiner and the offline dataset path (``featurise``) both featurise here, so their samples cannot
    differ. ``contexts`` are each impression's (name, value) pairs sorted by name.
    """
    users = np.asarray(user_ids, np.int64)
    items = np.asarray(item_ids, np.int64)
    fids, lengths = batch_example_fids(users, items, np.asarray(positions, np.int64), contexts)
    label_vectors = np.asarray(label_vectors, np.float32).reshape(len(users), LABELS)
    return SampleArrays(
        fids=fids,
        lengths=lengths,
        labels=label_vectors[:, 0].copy(),
        weights=np.asarray(weights, np.float32),
        sample_ids=sample_ids,
        event_time_ms=np.asarray(event_time_ms, np.int64),
        user_ids=users,
        item_ids=items,
        label_vectors=label_vectors,
        versions=np.asarray(versions, np.int32),
    )


def encode_samples(samples: Sequence[Sample]) -> bytes:
    """Serialises samples as one ``SampleBatch``."""
    label_vectors = np.array([s.label_vector or (s.label, 0.0, 0.0, 0.0) for s in samples], np.float32)
    return encode_sample_arrays(
        SampleArrays(
            fids=np.concatenate([s.fids for s in samples]).astype(np.int64),
            lengths=np.array([len(s.fids) for s in samples], np.int32),
            labels=np.array([s.label for s in samples], np.float32),
            weights=np.array([s.weight for s in samples], np.float32),
            sample_ids=[s.sample_id for s in samples],
            event_time_ms=np.array([s.event_time_ms for s in samples], np.int64),
            user_ids=np.array([s.user_id for s in samples], np.int64),
            item_ids=np.array([s.item_id for s in samples], np.int64),
            label_vectors=label_vectors.reshape(-1, LABELS),
            versions=np.array([s.version for s in samples], np.int32),
        )
    )


def encode_sample_arrays(batch: SampleArrays) -> bytes:
    """Serialises a batch of samples held as arrays as one ``SampleBatch``."""
    return samples_pb2.SampleBatch(
        fids=to_tensor(batch.fids.astype(np.int64, copy=False)),
        lengths=to_tensor(batch.lengths.astype(np.int32, copy=False)),
        labels=to_tensor(batch.labels.astype(np.float32, copy=False)),
        weights=to_tensor(batch.weights.astype(np.float32, copy=False)),
        sample_ids=batch.sample_ids,
        event_time_ms=to_tensor(batch.event_time_ms.astype(np.int64, copy=False)),
        user_ids=to_tensor(batch.user_ids.astype(np.int64, copy=False)),
        item_ids=to_tensor(batch.item_ids.astype(np.int64, copy=False)),
        label_vectors=to_tensor(batch.label_vectors.astype(np.float32, copy=False)),
        versions=to_tensor(batch.versions.astype(np.int32, copy=False)),
    ).SerializeToString()


def decode_samples(data: bytes) -> SampleArrays:
    """Parses and checks a ``SampleBatch``.

    Raises:
        google.protobuf.message.DecodeError: the bytes are not a SampleBatch.
        freshet.tensors.TensorError / ValueError: tensors disagree in size or type.
    """
    msg = samples_pb2.SampleBatch.FromString(data)
    lengths = from_tensor(msg.lengths, np.int32, 1, "lengths")
    out = SampleArrays(
        fids=from_tensor(msg.fids, np.int64, 1, "fids"),
        lengths=lengths,
        labels=from_tensor(msg.labels, np.float32, 1, "labels"),
        weights=from_tensor(msg.weights, np.float32, 1, "weights"),
        sample_ids=list(msg.sample_ids),
        event_time_ms=from_tensor(msg.event_time_ms, np.int64, 1, "event_time_ms"),
        user_ids=from_tensor(msg.user_ids, np.int64, 1, "user_ids"),
        item_ids=from_tensor(msg.item_ids, np.int64, 1, "item_ids"),
        label_vectors=(
            from_tensor(msg.label_vectors, np.float32, 2, "label_vectors")
            if msg.HasField("label_vectors")
            else np.stack(
                [from_tensor(msg.labels, np.float32, 1, "labels"), *[np.zeros(len(lengths), np.float32)] * 3], 1
            )
            if len(lengths)
            else np.zeros((0, LABELS), np.float32)
        ),
        versions=(
            from_tensor(msg.versions, np.int32, 1, "versions")
            if msg.HasField("versions")
            else np.ones(len(lengths), np.int32)
        ),
    )
    n = len(lengths)
    sizes = {len(out.labels), len(out.weights), len(out.sample_ids), len(out.event_time_ms), len(out.versions)}
    if out.label_vectors.shape != (n, LABELS):
        raise ValueError(
            f"inconsistent SampleBatch: label_vectors shape {list(out.label_vectors.shape)}, {n} samples"
        )
    if sizes != {n} or (lengths < 0).any() or int(lengths.sum()) != len(out.fids):
        raise ValueError(
            f"inconsistent SampleBatch: {n} lengths summing to {int(lengths.sum())}, {len(out.fids)} fids"
        )
    return out


class SampleReader:
    """Reads the SAMPLES stream incrementally (a sample message may hold many samples).

    ``await reader.read()`` decodes the messages stored since the previous call; ``ids`` (every
    sample id read, in stream order, duplicates kept), ``labels`` (sample id -> click label) and
    ``batches`` (one decoded ``SampleArrays`` per message) hold everything read so far.
    """

    def __init__(self, js, stream: str = "SAMPLES") -> None:
        self.js = js
        self.stream = stream
        self.next_seq = 1
        self.batches: list = []  # decoded SampleArrays, one per message, in stream order
        self.ids: list[str] = []
        self.labels: dict[str, float] = {}

    async def read(self) -> int:
        """Decodes new messages; returns the number of samples read so far."""
        info = await self.js.stream_info(self.stream)
        for seq in range(max(self.next_seq, info.state.first_seq), info.state.last_seq + 1):
            batch = decode_samples((await self.js.get_msg(self.stream, seq)).data)
            self.batches.append(batch)
            self.ids.extend(batch.sample_ids)
            self.labels.update(zip(batch.sample_ids, batch.labels.tolist(), strict=True))
        self.next_seq = max(self.next_seq, info.state.last_seq + 1)
        return len(self.ids)
