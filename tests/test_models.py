"""Tests of the trainer's CTR models: gradient parity with a per-sample reference, planning, the baseline, config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from freshet.fids import SLOT_ITEM, SLOT_POSITION, SLOT_USER, VALUE_BITS
from freshet.models import (
    TASKS,
    CtrModel,
    ModelConfig,
    StaticEmbeddings,
    loss,
    plan,
    pool,
)

_OTHER_SLOTS = (70, 300)  # not in the default fields: pooled into "other"
_SLOTS = (SLOT_USER, SLOT_ITEM, SLOT_POSITION, *_OTHER_SLOTS)


def _batch(seed: int = 0, n: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fids [T], lengths [B] (variable, one empty sample), label_vectors [B, 4], weights [B]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 8, size=n).astype(np.int32)
    lengths[3] = 0
    slots = rng.choice(_SLOTS, size=int(lengths.sum()))
    # Few values per slot, so fids repeat within and across samples (their gradients must add up).
    fids = (slots.astype(np.int64) << VALUE_BITS) | rng.integers(0, 4, size=len(slots))
    labels = np.zeros((n, 4), np.float32)
    labels[:, :3] = rng.integers(0, 2, size=(n, 3))
    labels[:, 3] = rng.uniform(0, 30, size=n)
    weights = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    return fids, lengths, labels, weights


def _rows(batch_plan, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(len(tp.fids), tp.width, generator=gen) * 0.5).requires_grad_(True)
        for name, tp in batch_plan.tables.items()
    }


# -- a straightforward reference: a Python loop over samples and fids --------------------------------------------


def _table_of(config: ModelConfig, slot: int) -> str:
    dim = config.slot_dims.get(slot, config.dim) if slot in config.fields else config.dim
    width = config.row_width(dim)
    return config.table_prefix if width == config.row_width(config.dim) else f"{config.table_prefix}_{width}"


def _mlp(x: torch.Tensor, params: dict[str, torch.Tensor], prefix: str, final_relu: bool = False) -> torch.Tensor:
    layers = sorted({int(k.split(".")[1]) for k in params if k.startswith(prefix + ".")})
    for n, i in enumerate(layers):
        x = params[f"{prefix}.{i}.weight"] @ x + params[f"{prefix}.{i}.bias"]
        if n < len(layers) - 1 or final_relu:
            x = torch.relu(x)
    return x


def _project(config: ModelConfig, params: dict[str, torch.Tensor], f: int, v: torch.Tensor) -> torch.Tensor:
    key = f"proj.{f}.weight"
    return params[key] @ v if key in params else v


def _reference(config, fids, lengths, embeddings, index, params) -> torch.Tensor:
    """Logits [B, n_tasks], one sample and one fid at a time."""
    n_fields = len(config.fields) + 1
    dims = [config.slot_dims.get(s, config.dim) for s in config.fields] + [config.dim]
    out, start = [], 0
    for length in lengths:
        linear = torch.zeros(())
        vectors = [torch.zeros(d) for d in dims]
        counts = torch.zeros(n_fields)
        for fid in fids[start : start + length]:
            slot = int(fid) >> VALUE_BITS
            table = _table_of(config, slot)
            row = embeddings[table](torch.tensor(index[table][int(fid)]))
            f = config.fields.index(slot) if slot in config.fields else n_fields - 1
            counts[f] += 1
            if config.has_linear:
                linear = linear + row[0]
                row = row[1:]
            if config.kind != "lr":
                vectors[f] = vectors[f] + row
        start += length
        n_tasks = len(config.tasks)
        if config.kind == "lr":
            logit = params["bias"] + linear
        elif config.kind in ("fm", "deepfm"):
            p = [_project(config, params, f, v) for f, v in enumerate(vectors)]
            pairwise = sum(torch.dot(p[a], p[b]) for a in range(n_fields) for b in range(a + 1, n_fields))
            logit = linear + pairwise + (params["bias"] if config.kind == "fm" else torch.zeros(n_tasks))
            if config.kind == "deepfm":
                logit = logit + _mlp(torch.cat(vectors), params, "deep")
        else:
            p = [_project(config, params, f, v) for f, v in enumerate(vectors)]
            head = []
            if config.bottom:
                z = _mlp(torch.log1p(counts), params, "bottom", final_relu=True)
                p, head = [z, *p], [z]
            dots = [torch.dot(p[i], p[j]).reshape(1) for i in range(len(p)) for j in range(i)]
            logit = _mlp(torch.cat([*head, *dots]), params, "top")
        out.append(logit.reshape(n_tasks))
    return torch.stack(out)


def _reference_loss(logits, labels, weights, tasks) -> torch.Tensor:
    total = torch.zeros(())
    for i in range(logits.shape[0]):
        for t, task in enumerate(tasks):
            x, y = logits[i, t], float(labels[i, TASKS.index(task)])
            total = total + float(weights[i]) * (F.softplus(x) - y * x)
    return total


_PARITY_CONFIGS = {
    "lr": ModelConfig(kind="lr"),
    "fm": ModelConfig(kind="fm", dim=4),
    "fm_context_field": ModelConfig(kind="fm", dim=4, fields=(SLOT_USER, SLOT_ITEM, 70)),
    "deepfm": ModelConfig(kind="deepfm", dim=4, deep=(8, 6)),
    "dlrm": ModelConfig(kind="dlrm", dim=4, top=(8,)),
    "deepfm_2tasks": ModelConfig(kind="deepfm", dim=4, deep=(8,), tasks=("click", "share")),
    "dlrm_2tasks_bottom": ModelConfig(kind="dlrm", dim=4, top=(8,), bottom=(5,), tasks=("like", "click")),
    "deepfm_slot_dims": ModelConfig(kind="deepfm", dim=4, deep=(8,), slot_dims={SLOT_USER: 6, SLOT_ITEM: 3}),
    "dlrm_slot_dims": ModelConfig(kind="dlrm", dim=4, top=(8,), bottom=(5,), slot_dims={SLOT_ITEM: 6, 70: 4}),
}


@pytest.mark.parametrize("config", list(_PARITY_CONFIGS.values()), ids=list(_PARITY_CONFIGS))
def test_logits_and_gradients_match_the_per_sample_reference(config: ModelConfig) -> None:
    fids, lengths, labels, weights = _batch()
    batch_plan = plan(fids, lengths, config)
    rows = _rows(batch_plan)
    model = CtrModel(config, seed=0)
    logits = model(pool(batch_plan, rows))
    loss(logits, labels, weights, config.tasks).backward()

    embeddings, index = {}, {}
    for name, width in config.tables().items():
        table_fids = sorted({int(f) for f in fids if _table_of(config, int(f) >> VALUE_BITS) == name})
        np.testing.assert_array_equal(batch_plan.tables[name].fids, table_fids)
        embeddings[name] = torch.nn.Embedding(len(table_fids), width)
        with torch.no_grad():
            embeddings[name].weight.copy_(rows[name])
        index[name] = {f: i for i, f in enumerate(table_fids)}
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    ref_logits = _reference(config, fids, lengths, embeddings, index, params)
    _reference_loss(ref_logits, labels, weights, config.tasks).backward()

    assert logits.shape == (len(lengths), len(config.tasks))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in config.tables():
        torch.testing.assert_close(rows[name].grad, embeddings[name].weight.grad, atol=1e-5, rtol=1e-5)
    assert params, "every kind has a dense parameter"
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[key].grad, atol=1e-5, rtol=1e-5, msg=key)


def test_per_slot_dims_give_one_table_per_row_width() -> None:
    config = ModelConfig(kind="deepfm", dim=8, slot_dims={SLOT_USER: 16, SLOT_ITEM: 16, SLOT_POSITION: 4})
    assert config.tables() == {"fm": 9, "fm_5": 5, "fm_17": 17}
    fids = np.array(
        [SLOT_USER << VALUE_BITS | 5, SLOT_ITEM << VALUE_BITS, SLOT_POSITION << VALUE_BITS, 99 << VALUE_BITS]
    )
    np.testing.assert_array_equal(config.table_index(fids), [2, 2, 1, 0])
    np.testing.assert_array_equal(config.field_index(fids), [0, 1, 2, 3])
    assert ModelConfig(kind="dlrm", dim=8, table_prefix="ctr").tables() == {"ctr": 8}
    assert ModelConfig(kind="lr", table_prefix="lr").tables() == {"lr": 1}


@pytest.mark.parametrize("config", [ModelConfig(), _PARITY_CONFIGS["dlrm_slot_dims"]], ids=["one_table", "three"])
def test_plan_pulls_sorted_distinct_fids_and_maps_every_occurrence(config: ModelConfig) -> None:
    fids, lengths, _, _ = _batch(seed=5, n=40)
    batch_plan = plan(fids, lengths, config)
    samples = np.repeat(np.arange(len(lengths)), lengths)
    seen = np.zeros(len(fids), bool)
    for name, tp in batch_plan.tables.items():
        assert tp.width == config.tables()[name]
        assert (np.diff(tp.fids) > 0).all()
        in_table = config.table_index(fids) == list(config.tables()).index(name)
        np.testing.assert_array_equal(tp.fids, np.unique(fids[in_table]))
        np.testing.assert_array_equal(tp.fids[tp.rows], fids[in_table])  # the inverse reconstructs the fids
        np.testing.assert_array_equal(tp.samples, samples[in_table])
        np.testing.assert_array_equal(tp.fields, config.field_index(fids[in_table]))
        seen |= in_table
        # Both groupings hold the same (bag, row) pairs as the occurrences.
        n_bags = len(lengths) * max(1, len(tp.table_fields))
        assert len(tp.bag_offsets) == n_bags and len(tp.row_offsets) == len(tp.fids)
        expected = np.zeros((n_bags, len(tp.fids)), np.int64)
        np.add.at(expected, (tp.bags, tp.rows), 1)
        by_bag, by_row = np.zeros_like(expected), np.zeros_like(expected)
        np.add.at(by_bag, (_owners(tp.bag_offsets, len(tp.rows)), tp.bag_rows), 1)
        np.add.at(by_row, (tp.row_bags, _owners(tp.row_offsets, len(tp.rows))), 1)
        np.testing.assert_array_equal(by_bag, expected)
        np.testing.assert_array_equal(by_row, expected)
    assert seen.all()
    assert batch_plan.counts.sum() == len(fids)
    np.testing.assert_array_equal(batch_plan.counts.sum(axis=1), lengths)


def _owners(offsets: np.ndarray, n: int) -> np.ndarray:
    """For CSR start offsets, the group of each of the n elements."""
    return np.repeat(np.arange(len(offsets)), np.diff(np.append(offsets, n)))


@pytest.mark.parametrize("config", [ModelConfig(), _PARITY_CONFIGS["dlrm_slot_dims"], ModelConfig(kind="lr")])
@pytest.mark.parametrize("lengths", [[], [0, 0], [1, 0]], ids=["no_samples", "no_fids", "one_table_empty"])
def test_empty_batches_and_empty_tables_pool_to_zeros(config: ModelConfig, lengths: list[int]) -> None:
    fids = np.full(sum(lengths), SLOT_USER << VALUE_BITS, np.int64)
    lengths = np.array(lengths, np.int32)
    batch_plan = plan(fids, lengths, config)
    rows = _rows(batch_plan)
    logits = CtrModel(config, seed=0)(pool(batch_plan, rows))
    assert logits.shape == (len(lengths), 1)
    loss(
        logits, np.ones((len(lengths), 4), np.float32), np.ones(len(lengths), np.float32), config.tasks
    ).backward()
    for name, tp in batch_plan.tables.items():
        assert rows[name].grad.shape == (len(tp.fids), tp.width)
    assert CtrModel(config, seed=0)(StaticEmbeddings(config, num_rows=10)(fids, lengths)).shape == logits.shape


def test_plan_rejects_lengths_that_do_not_add_up() -> None:
    with pytest.raises(ValueError, match="lengths summing to 3"):
        plan(np.arange(4, dtype=np.int64), np.array([1, 2], np.int32), ModelConfig())


def test_pool_gives_zeros_for_missing_fields_and_rejects_misshaped_rows() -> None:
    config = ModelConfig(kind="fm", dim=4)
    batch_plan = plan(np.array([SLOT_USER << VALUE_BITS], np.int64), np.array([1, 0], np.int32), config)
    pooled = pool(batch_plan, {"fm": torch.ones(1, 5)})
    torch.testing.assert_close(pooled.linear, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(pooled.fields[0], torch.tensor([[1.0] * 4, [0.0] * 4]))
    for f in pooled.fields[1:]:
        torch.testing.assert_close(f, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rows of table 'fm'"):
        pool(batch_plan, {"fm": torch.ones(1, 4)})


@pytest.mark.parametrize(
    "config", [ModelConfig(), ModelConfig(kind="lr"), _PARITY_CONFIGS["dlrm_slot_dims"]], ids=["fm", "lr", "dlrm"]
)
def test_static_embeddings_pool_like_pulled_rows(config: ModelConfig) -> None:
    fids, lengths, _, _ = _batch(seed=2, n=30)
    batch_plan = plan(fids, lengths, config)
    rows = _rows(batch_plan)
    static = StaticEmbeddings(config, num_rows=100_003)
    with torch.no_grad():
        for name, tp in batch_plan.tables.items():
            slots = tp.fids % 100_003
            assert len(set(slots.tolist())) == len(slots), "the test's fids must not collide"
            static.bag(name).weight[torch.from_numpy(slots)] = rows[name]
    expected, got = pool(batch_plan, rows), static(fids, lengths)
    torch.testing.assert_close(got.linear, expected.linear)
    torch.testing.assert_close(got.counts, expected.counts)
    assert len(got.fields) == len(expected.fields) == len(config.field_dims)
    for g, e in zip(got.fields, expected.fields, strict=True):
        torch.testing.assert_close(g, e)


def test_static_embeddings_start_like_store_rows() -> None:
    static = StaticEmbeddings(ModelConfig(), num_rows=1000, init_scale=0.01, seed=3)
    weight = static.bag("fm").weight
    assert weight.shape == (1000, 9) and weight.abs().max() <= 0.01 and weight.std() > 0.004
    torch.testing.assert_close(weight, StaticEmbeddings(ModelConfig(), num_rows=1000, seed=3).bag("fm").weight)


def test_weight_zero_sample_contributes_no_gradient() -> None:
    config = _PARITY_CONFIGS["deepfm_2tasks"]
    fids, lengths, labels, weights = _batch()
    only_in_0 = np.int64(SLOT_ITEM) << VALUE_BITS | 12345  # a fid that only sample 0 has
    fids = np.concatenate([[only_in_0], fids])
    lengths = lengths.copy()
    lengths[0] += 1
    weights = weights.copy()
    weights[0] = 0.0
    grads = []
    for flip in (False, True):
        if flip:
            labels = labels.copy()
            labels[0, :3] = 1 - labels[0, :3]
        batch_plan = plan(fids, lengths, config)
        rows = _rows(batch_plan)
        model = CtrModel(config, seed=0)
        loss(model(pool(batch_plan, rows)), labels, weights, config.tasks).backward()
        tp = batch_plan.tables["fm"]
        assert not rows["fm"].grad[np.searchsorted(tp.fids, only_in_0)].any()
        grads.append([rows["fm"].grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_loss_is_summed_over_samples_and_tasks() -> None:
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    labels = np.array([[1, 0, 1, 3.0], [0, 1, 0, 0.0]], np.float32)
    weights = np.array([2.0, 0.5], np.float32)
    expected = _reference_loss(logits, labels, weights, ("click", "share"))
    torch.testing.assert_close(loss(logits, labels, weights, ("click", "share")), expected)
    doubled = loss(
        torch.cat([logits, logits]), np.concatenate([labels, labels]), np.tile(weights, 2), ("click", "share")
    )
    torch.testing.assert_close(doubled, 2 * expected)


def test_dense_init_is_deterministic_with_a_seed_and_leaves_the_global_rng_alone() -> None:
    config = _PARITY_CONFIGS["dlrm_2tasks_bottom"]
    state = torch.random.get_rng_state()
    a, b = CtrModel(config, seed=7).state_dict(), CtrModel(config, seed=7).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(CtrModel(config, seed=8).state_dict()["top.0.weight"], a["top.0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "wide"}, "kind"),
        ({"dim": 0}, "dim"),
        ({"kind": "fm", "tasks": ("click", "like")}, "tasks"),
        ({"kind": "lr", "tasks": ("click", "like")}, "tasks"),
        ({"kind": "deepfm", "tasks": ("dwell",)}, "tasks"),
        ({"kind": "deepfm", "tasks": ()}, "tasks"),
        ({"kind": "lr", "slot_dims": {SLOT_USER: 4}}, "slot_dims"),
        ({"kind": "fm", "slot_dims": {SLOT_USER: 4}}, "slot_dims"),
        ({"kind": "deepfm", "slot_dims": {70: 4}}, "slot_dims"),
        ({"kind": "deepfm", "slot_dims": {SLOT_USER: 0}}, "slot_dims"),
        ({"fields": (SLOT_USER, SLOT_USER)}, "fields"),
        ({"fields": (1 << 20,)}, "fields"),
        ({"deep": (64, 0)}, "deep"),
        ({"bottom": ("x",)}, "bottom"),
        ({"table_prefix": ""}, "table_prefix"),
    ],
)
def test_invalid_config_is_rejected_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_from_json_reads_string_slot_keys_and_lists_and_rejects_unknown_keys() -> None:
    text = json.dumps({"kind": "dlrm", "dim": 8, "slot_dims": {"2": 16}, "top": [32], "tasks": ["click", "like"]})
    config = ModelConfig.from_json(text)
    assert config == ModelConfig(kind="dlrm", dim=8, slot_dims={SLOT_ITEM: 16}, top=(32,), tasks=("click", "like"))
    assert hash(config) == hash(ModelConfig.from_json(config.to_json()))
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"unknown keys \['factors', 'layers'\]"):
        ModelConfig.from_json('{"kind": "fm", "factors": 8, "layers": [1]}')
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{kind: fm}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pool_and_model_on_cuda_match_cpu() -> None:
    config = _PARITY_CONFIGS["dlrm_slot_dims"]
    fids, lengths, labels, weights = _batch()
    batch_plan = plan(fids, lengths, config)
    results = []
    for device in ("cpu", "cuda"):
        rows = {k: v.detach().to(device).requires_grad_(True) for k, v in _rows(batch_plan).items()}
        model = CtrModel(config, seed=0).to(device)
        logits = model(pool(batch_plan, rows))
        loss(logits, labels, weights, config.tasks).backward()
        results.append([logits.detach().cpu(), *(r.grad.cpu() for r in rows.values())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_loss_takes_a_weight_per_sample_and_task():
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    vectors = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    per_sample = loss(logits, vectors, np.array([1.0, 2.0], np.float32), ("click", "like"))
    per_task = loss(logits, vectors, np.array([[1.0, 1.0], [2.0, 2.0]], np.float32), ("click", "like"))
    assert float(per_task) == pytest.approx(float(per_sample))
    click_only = loss(logits, vectors, np.array([[1.0, 0.0], [2.0, 0.0]], np.float32), ("click", "like"))
    assert float(click_only) == pytest.approx(
        float(loss(logits[:, :1], vectors, np.array([1.0, 2.0]), ("click",)))
    )
