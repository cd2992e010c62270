"""Synthetic samples and quickly trained rows for the validator's tests (unit and integration)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from freshet.batches import SampleArrays, featurise
from freshet.delta import Delta
from freshet.models import plan, pool
from freshet.replica import Replica
from freshet.synthetic import SyntheticConfig, SyntheticSource

# A learnable stream with a high click rate, so a few thousand samples carry enough positives.
CONFIG = SyntheticConfig(seed=11, n_users=150, n_items=60, target_ctr=0.15, interest_std=2.0, item_bias_std=1.0)


def synthetic_samples(n_requests: int, source: SyntheticSource | None = None, start_ms: int = 0) -> SampleArrays:
    """Labelled samples (5 per request) of the synthetic click model, featurised like the joiner's."""
    source = source or SyntheticSource(CONFIG)
    impressions, contexts, labels = [], [], []
    for r in range(n_requests):
        req = source.next_request(start_ms + r)
        for imp, clicked in zip(req.impressions, req.clicked, strict=True):
            impressions.append(imp)
            contexts.append(sorted(imp.context.items()))
            labels.append([float(clicked), 0.0, 0.0, 0.0])
    n = len(impressions)
    return featurise(
        impressions,
        contexts,
        np.array(labels, np.float32),
        np.ones(n, np.float32),
        [f"s{start_ms}-{i}" for i in range(n)],
        np.ones(n, np.int32),
    )


def sample_slice(samples: SampleArrays, start: int, stop: int) -> SampleArrays:
    """Samples ``start:stop`` of a batch (their fids are the matching run of ``fids``)."""
    offsets = np.concatenate([[0], np.cumsum(samples.lengths)])
    fields = {k: v[start:stop] for k, v in samples.__dict__.items() if k != "fids"}
    return SampleArrays(fids=samples.fids[offsets[start] : offsets[min(stop, len(samples))]], **fields)


def flipped(samples: SampleArrays) -> SampleArrays:
    """The same samples with every click label flipped (a poisoned burst)."""
    labels = 1.0 - samples.labels
    vectors = samples.label_vectors.copy()
    vectors[:, 0] = labels
    return SampleArrays(**{**samples.__dict__, "labels": labels, "label_vectors": vectors})


def train_delta(
    replica: Replica,
    samples: SampleArrays,
    steps: int = 60,
    lr: float = 0.5,
    sequence: int = 1,
    shard: int = 0,
) -> Delta:
    """Rows of ``replica``'s table after full-batch gradient steps on ``samples`` (the replica is not changed).

    Returns:
        A delta of every row the samples touch: fids int64 [U], values float32 [U, width].
    """
    table = next(iter(replica.tables))
    batch = plan(samples.fids, samples.lengths, replica.config)
    fids = batch.tables[table].fids
    rows = torch.from_numpy(replica.tables[table].lookup(fids))
    labels = torch.from_numpy(np.asarray(samples.labels, np.float32))
    for _ in range(steps):
        rows.requires_grad_(True)
        logits = replica.model(pool(batch, {table: rows}))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, rows)
        # Per-row normalised step (like Adagrad's first step): rare fids learn as fast as common ones.
        counts = torch.from_numpy(np.bincount(batch.tables[table].rows, minlength=len(fids)).astype(np.float32))
        rows = (rows - lr * grad / counts.clamp(min=1)[:, None]).detach()
    return Delta(
        model="fm",
        table=table,
        shard=shard,
        sequence=sequence,
        base_version=sequence - 1,
        new_version=sequence,
        fids=fids.copy(),
        values=rows.numpy().astype(np.float32),
    )
