"""The joiner's samples: ``sample_arrays`` featurises joined impressions exactly as ``example_fids`` does."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.batches import decode_samples, encode_sample_arrays
from freshet.fids import example_fids
from services.joiner.columnjoin import JoinedColumns
from services.joiner.eventjoin import ImpressionEvent, JoinedSample
from services.joiner.service import sample_arrays


def columns(samples: list[JoinedSample]) -> JoinedColumns:
    imps = [s.impression for s in samples]
    return JoinedColumns(
        request_ids=[imp.request_id for imp in imps],
        item_ids=np.array([imp.item_id for imp in imps], np.int64),
        user_ids=np.array([imp.user_id for imp in imps], np.int64),
        positions=np.array([imp.position for imp in imps], np.int64),
        event_time_ms=np.array([imp.event_time_ms for imp in imps], np.int64),
        contexts=[imp.context for imp in imps],
        label_vectors=np.array([s.label_vector for s in samples], np.float64).reshape(-1, 4),
        versions=np.array([s.version for s in samples], np.int32),
        weights=np.array([s.weight for s in samples], np.float64),
        corrections=np.array([s.correction for s in samples], np.bool_),
    )


def joined(n: int, contexts: list[tuple[tuple[str, str], ...]], seed: int = 0) -> list[JoinedSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        imp = ImpressionEvent(
            f"r{i}", int(rng.integers(-5, 1 << 40)), int(rng.integers(0, 1 << 40)), i % 7, 1000 + i, contexts[i]
        )
        labels = tuple(float(x) for x in rng.integers(0, 2, 4))
        out.append(
            JoinedSample(f"r{i}:{imp.item_id}:v{1 + i % 3}", imp.key, labels, 1 + i % 3, 0.5 + i, False, imp)
        )
    return out


@pytest.mark.parametrize(
    "contexts",
    [
        [()] * 6,  # none
        [(("device", f"d{i % 2}"),) for i in range(6)],  # one each, the common case
        [(("a", "x"), ("device", f"d{i}")) for i in range(6)],
        [tuple((f"k{j}", "v") for j in range(i % 3)) for i in range(6)],  # as many as they like
    ],
)
def test_sample_arrays_hold_each_samples_fids_labels_and_ids_in_order(contexts):
    samples = joined(6, contexts)
    arrays = decode_samples(encode_sample_arrays(sample_arrays(columns(samples))))
    offsets = np.concatenate([[0], np.cumsum(arrays.lengths)])
    for i, s in enumerate(samples):
        imp = s.impression
        want = example_fids(imp.user_id, [imp.item_id], imp.position, dict(imp.context))[0]
        np.testing.assert_array_equal(arrays.fids[offsets[i] : offsets[i + 1]], want)
    assert arrays.sample_ids == [s.sample_id for s in samples]
    np.testing.assert_array_equal(arrays.label_vectors, np.array([s.label_vector for s in samples], np.float32))
    np.testing.assert_array_equal(arrays.labels, [s.label_vector[0] for s in samples])
    np.testing.assert_array_equal(arrays.weights, [s.weight for s in samples])
    np.testing.assert_array_equal(arrays.versions, [s.version for s in samples])
    np.testing.assert_array_equal(arrays.user_ids, [s.impression.user_id for s in samples])
    np.testing.assert_array_equal(arrays.item_ids, [s.impression.item_id for s in samples])
    np.testing.assert_array_equal(arrays.event_time_ms, [s.impression.event_time_ms for s in samples])


def test_sample_arrays_of_nothing_is_an_empty_batch():
    arrays = sample_arrays(columns([]))
    assert len(arrays) == 0 and arrays.label_vectors.shape == (0, 4) and len(arrays.fids) == 0
