"""Sample batches on the wire: lengths + values layout, label vectors and versions."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.batches import Sample, decode_samples, encode_samples
from freshet.samples.v1 import samples_pb2


def test_samples_round_trip_with_variable_lengths_label_vectors_and_versions():
    samples = [
        Sample("r1:7:v1", np.array([1, 2, 3], np.int64), 1.0, weight=1.0, label_vector=(1.0, 0.0, 0.0, 0.0)),
        Sample("r1:7:v2", np.array([1, 2, 3], np.int64), 1.0, label_vector=(1.0, 1.0, 0.0, 12.5), version=2),
        Sample("r2:8:v1", np.array([4], np.int64), 0.0, weight=4.0),
    ]
    batch = decode_samples(encode_samples(samples))
    assert batch.sample_ids == ["r1:7:v1", "r1:7:v2", "r2:8:v1"]
    assert batch.lengths.tolist() == [3, 3, 1] and batch.fids.tolist() == [1, 2, 3, 1, 2, 3, 4]
    assert batch.label_vectors.tolist() == [[1, 0, 0, 0], [1, 1, 0, 12.5], [0, 0, 0, 0]]
    assert batch.versions.tolist() == [1, 2, 1] and batch.weights.tolist() == [1.0, 1.0, 4.0]


def test_a_batch_without_label_vectors_reads_its_click_labels_as_version_one():
    full = samples_pb2.SampleBatch.FromString(encode_samples([Sample("a", np.array([1], np.int64), 1.0)]))
    full.ClearField("label_vectors")
    full.ClearField("versions")
    batch = decode_samples(full.SerializeToString())
    assert batch.label_vectors.tolist() == [[1, 0, 0, 0]] and batch.versions.tolist() == [1]


def test_inconsistent_lengths_are_rejected():
    msg = samples_pb2.SampleBatch.FromString(encode_samples([Sample("a", np.array([1, 2], np.int64), 1.0)]))
    msg.sample_ids.append("extra")
    with pytest.raises(ValueError, match="inconsistent SampleBatch"):
        decode_samples(msg.SerializeToString())
