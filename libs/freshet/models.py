"""CTR models over sparse rows pulled from the embedding store: LR, FM, DeepFM and DLRM.

A training step is split in three so that the same dense module runs on rows pulled from the
store or on a static ``torch.nn.EmbeddingBag`` baseline (``StaticEmbeddings``):

    plan(fids, lengths, config) -> BatchPlan      numpy: distinct fids to pull per table, and where
                                                  each fid occurrence goes (row, sample, field)
    pool(plan, rows) -> Pooled                    torch: sum pooling per sample and field, differentiable
                                                  w.r.t. the pulled rows
    CtrModel(config)(pooled) -> logits            torch: the dense part, a normal ``nn.Module``,
                                                  [B, n_tasks]

A trainer step with the store::

    batch_plan = plan(batch.fids, batch.lengths, config)
    rows = {name: torch.from_numpy(await store.pull(name, tp.fids)).requires_grad_()
            for name, tp in batch_plan.tables.items()}
    logits = model(pool(batch_plan, rows))
    loss(logits, batch.label_vectors, batch.weights, config.tasks).backward()
    for name, tp in batch_plan.tables.items():
        await store.push(name, tp.fids, rows[name].grad.numpy())  # fids sorted and distinct

Fields: each slot in ``ModelConfig.fields`` is one field; fids of every other slot are sum-pooled
into one extra "other" field, always the last. Pairwise terms (FM, DLRM) act between field vectors,
so two fids of one field do not interact (an FM over fields, as in DeepFM). Rows of a fid
(all float32):

    lr          [w]                   one first-order weight
    fm, deepfm  [w, v_1 .. v_d]       first-order weight, then the slot's d-dim factor
    dlrm        [v_1 .. v_d]          the slot's d-dim embedding

Tables: slots are grouped by row width, one store table per width. The table of width
``row_width(dim)`` (every slot without an override, and the "other" field) is named
``table_prefix``, so ``ModelConfig(kind="fm", table_prefix="fm")`` reads today's ``fm:9`` table;
every other width ``w`` gets ``f"{table_prefix}_{w}"``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from freshet.fids import MAX_SLOT, SLOT_ITEM, SLOT_POSITION, SLOT_USER, VALUE_BITS

KINDS = ("lr", "fm", "deepfm", "dlrm")
TASKS = ("click", "like", "share")  # column i of SampleArrays.label_vectors ([click, like, share, dwell_s])


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"ModelConfig.{name} must be a sequence of ints, got {values!r}") from None
    if any(v <= 0 for v in out):
        raise ValueError(f"ModelConfig.{name} must hold positive ints, got {values!r}")
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a CTR model and of its store tables.

    The default, FM with d = 8 (rows [w, v_1..v_8], the store's default ``fm:9`` table), was
    picked on a time-ordered replay of MovieLens-100k (rating >= 4 as click; user, item, and
    age/gender/occupation/genre pooled as "other"; batches of 512; store rows uniform +-0.01 with
    Adagrad; dense Adagrad), progressive AUC over all 100k samples:

        store lr / dense lr    lr      fm      deepfm   dlrm
        0.2 / 0.1            0.696   0.698   0.695    0.667
        0.05 / 0.1           0.670   0.707   0.701    0.682
        0.05 / 0.01          0.672   0.708   0.707    0.654

    FM is best or tied everywhere: 100k samples seen once are too few for DeepFM's MLP to add
    anything the pairwise term has not learnt, and it costs noise at a high dense lr; DLRM,
    without first-order weights, starts slowest; LR cannot personalise. FM is also the cheapest.
    Multi-task heads need DeepFM or DLRM.

    Attributes:
        kind: "lr", "fm", "deepfm" or "dlrm".
        dim: embedding dim of every slot without an override in ``slot_dims``.
        slot_dims: per-slot embedding dims, ``{slot: dim}``; only slots in ``fields`` may differ
            from ``dim`` (the "other" field sums vectors, so its slots share ``dim``). Plain FM
            needs one dim for all fields; DeepFM and DLRM project fields of another dim to
            ``dim`` with a per-field ``Linear`` for their pairwise terms. Not for "lr".
        fields: slots modelled as separate fields, in order; fids of any other slot are
            sum-pooled into one "other" field appended last.
        deep: DeepFM's MLP hidden sizes (its output layer, one logit per task, is appended).
        top: DLRM's top MLP hidden sizes (output layer appended likewise).
        bottom: DLRM's bottom MLP hidden sizes. Samples carry no dense features, so its input is
            ``log1p`` of the sample's fid count per field [B, n_fields]; an output layer to
            ``dim`` (ReLU, as in DLRM) is appended and its output takes part in the pairwise
            interactions (first vector) and is concatenated to the top MLP's input. It gives
            DLRM, whose rows have no first-order weight, a learned vector to dot every field
            with. Empty (the default): no bottom MLP.
        tasks: the heads, a subset of ("click", "like", "share"): one logit each, labelled by
            that column of ``label_vectors``. LR and FM support a single task.
        table_prefix: name of the store table of width ``row_width(dim)``; see the module doc.
    """

    kind: str = "fm"
    dim: int = 8
    slot_dims: dict[int, int] = field(default_factory=dict)
    fields: tuple[int, ...] = (SLOT_USER, SLOT_ITEM, SLOT_POSITION)
    deep: tuple[int, ...] = (64, 32)
    top: tuple[int, ...] = (64, 32)
    bottom: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ("click",)
    table_prefix: str = "fm"

    def __post_init__(self) -> None:
        # Normalise what JSON gives (lists, string keys), then validate.
        set_ = object.__setattr__
        if self.kind not in KINDS:
            raise ValueError(f"ModelConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"ModelConfig.dim must be a positive int, got {self.dim!r}")
        try:
            slot_dims = {int(k): int(v) for k, v in dict(self.slot_dims).items()}
        except (TypeError, ValueError):
            raise ValueError(
                f"ModelConfig.slot_dims must map int slots to int dims, got {self.slot_dims!r}"
            ) from None
        set_(self, "slot_dims", slot_dims)
        fields = tuple(int(s) for s in self.fields)
        set_(self, "fields", fields)
        for name in ("deep", "top", "bottom"):
            set_(self, name, _positive_ints(name, getattr(self, name)))
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        set_(self, "tasks", tasks)

        bad = [s for s in (*fields, *slot_dims) if not 0 <= s <= MAX_SLOT]
        if bad:
            raise ValueError(f"ModelConfig.fields/slot_dims: slots {bad} outside [0, {MAX_SLOT}]")
        if len(set(fields)) != len(fields):
            raise ValueError(f"ModelConfig.fields has duplicate slots: {fields}")
        if any(d <= 0 for d in slot_dims.values()):
            raise ValueError(f"ModelConfig.slot_dims must hold positive dims, got {slot_dims}")
        if self.kind == "lr" and slot_dims:
            raise ValueError("ModelConfig.slot_dims must be empty for kind 'lr' (rows are [w])")
        pooled = sorted(s for s, d in slot_dims.items() if s not in fields and d != self.dim)
        if pooled:
            raise ValueError(
                f"ModelConfig.slot_dims: slots {pooled} are not in fields, so they are pooled into the "
                f"'other' field of dim {self.dim}; add them to fields or drop their override"
            )
        if self.kind == "fm" and set(self.field_dims) != {self.dim}:
            raise ValueError(
                f"ModelConfig.slot_dims: kind 'fm' needs one dim for all fields, got {slot_dims} with dim {self.dim}"
            )
        if not tasks or any(t not in TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"ModelConfig.tasks must be distinct names from {TASKS}, got {self.tasks!r}")
        if self.kind in ("lr", "fm") and len(tasks) != 1:
            raise ValueError(f"ModelConfig.tasks: kind {self.kind!r} supports a single task, got {tasks}")
        if not isinstance(self.table_prefix, str) or not self.table_prefix:
            raise ValueError(f"ModelConfig.table_prefix must be a non-empty string, got {self.table_prefix!r}")

    def __hash__(self) -> int:  # slot_dims is a dict: hash its items
        slot_dims = tuple(sorted(self.slot_dims.items()))
        return hash((self.kind, self.dim, slot_dims, self.fields, self.deep, self.top, self.bottom, self.tasks))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """A config from JSON-like data, e.g. ``{"kind": "dlrm", "dim": 16, "slot_dims": {"2": 32}}``.

        Raises:
            ValueError: unknown keys (named) or invalid values (the field named).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """A config from a JSON object (see ``from_dict``), e.g. an env var or a file's content."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    # -- derived shapes ---------------------------------------------------------------------------------------

    @property
    def has_linear(self) -> bool:
        """Whether rows start with a first-order weight ``w``."""
        return self.kind != "dlrm"

    @property
    def n_fields(self) -> int:
        """Fields including the trailing "other" field."""
        return len(self.fields) + 1

    @property
    def field_dims(self) -> tuple[int, ...]:
        """Vector dim of each field ("other" last); empty for LR, which pools no vectors."""
        if self.kind == "lr":
            return ()
        return (*(self.slot_dims.get(s, self.dim) for s in self.fields), self.dim)

    def row_width(self, dim: int) -> int:
        """Floats per row of a slot of embedding dim ``dim``."""
        return {"lr": 1, "fm": 1 + dim, "deepfm": 1 + dim, "dlrm": dim}[self.kind]

    def tables(self) -> dict[str, int]:
        """Store table name -> row width; the default-width table ``table_prefix`` first."""
        default = self.row_width(self.dim)
        widths = sorted({self.row_width(d) for d in self.field_dims} - {default})
        return {self.table_prefix: default, **{f"{self.table_prefix}_{w}": w for w in widths}}

    def table_index(self, fids: np.ndarray) -> np.ndarray:
        """The table of each fid: int64 [n], an index into ``list(self.tables())``."""
        return self._slot_table[np.asarray(fids, np.int64) >> VALUE_BITS]

    def field_index(self, fids: np.ndarray) -> np.ndarray:
        """The field of each fid: int64 [n] in [0, n_fields); ``n_fields - 1`` is "other"."""
        return self._slot_field[np.asarray(fids, np.int64) >> VALUE_BITS]

    # Lookup tables over all 2**15 slots, so mapping fids is one gather (cached_property writes the
    # instance __dict__ directly, which a frozen dataclass allows).
    @cached_property
    def _slot_field(self) -> np.ndarray:
        lut = np.full(MAX_SLOT + 1, len(self.fields), np.int64)
        lut[list(self.fields)] = np.arange(len(self.fields))
        return lut

    @cached_property
    def _field_table(self) -> np.ndarray:
        """int64 [n_fields]: the table index of each field."""
        names = list(self.tables())
        dims = self.field_dims or (self.dim,) * self.n_fields
        return np.array([names.index(self._name_of_width(self.row_width(d))) for d in dims], np.int64)

    @cached_property
    def _slot_table(self) -> np.ndarray:
        lut = np.zeros(MAX_SLOT + 1, np.int64)  # "other" slots live in the default table, index 0
        lut[list(self.fields)] = self._field_table[: len(self.fields)]
        return lut

    @cached_property
    def _slot_position(self) -> np.ndarray:
        """Per slot, the position of its field among its table's fields."""
        position = np.zeros(self.n_fields, np.int64)  # LR: 0, one bag per sample
        for table_fields in self._table_fields:
            position[list(table_fields)] = np.arange(len(table_fields))
        return position[self._slot_field]

    @cached_property
    def _table_fields(self) -> tuple[tuple[int, ...], ...]:
        """Per table, the fields it holds (in field order); LR pools no field vectors: ((),)."""
        if self.kind == "lr":
            return ((),)
        return tuple(tuple(np.flatnonzero(self._field_table == t).tolist()) for t in range(len(self.tables())))

    @cached_property
    def _slot_bag_k(self) -> np.ndarray:
        """Per slot, the bags per sample of its table: max(1, fields in the table)."""
        return np.array([max(1, len(f)) for f in self._table_fields], np.int64)[self._slot_table]

    def _name_of_width(self, width: int) -> str:
        return self.table_prefix if width == self.row_width(self.dim) else f"{self.table_prefix}_{width}"


# -- pooling ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TablePlan:
    """What one table contributes to a batch.

    Occurrence arrays (``rows``, ``samples``, ``fields``, ``bags``) follow the batch's order of fids.
    Pooling is a sparse sum (bags x rows) done in both directions with ``embedding_bag``, which
    needs the occurrences grouped: by bag for the forward, by row for the backward (``pool``).

    Attributes:
        name: store table name.
        width: floats per row.
        fids: int64 [U], the distinct fids to pull, sorted ascending.
        rows: int64 [n], per fid occurrence in this table, its index into ``fids``.
        samples: int64 [n], per occurrence, its sample.
        fields: int64 [n], per occurrence, its field (global index, "other" = n_fields - 1).
        bags: int64 [n], the (sample, field) bucket it is summed into, ``samples * k + position``
            with k = max(1, len(table_fields)) and position its field's place in ``table_fields``.
        table_fields: the fields this table holds, in order (empty for LR: one bag per sample).
        bag_rows, bag_offsets: int64 [n], [B * k]: ``rows`` grouped by bag, and where each bag starts.
        row_bags, row_offsets: int64 [n], [U]: ``bags`` grouped by row, and where each row starts.
    """

    name: str
    width: int
    fids: np.ndarray
    rows: np.ndarray
    samples: np.ndarray
    fields: np.ndarray
    bags: np.ndarray
    table_fields: tuple[int, ...]
    bag_rows: np.ndarray
    bag_offsets: np.ndarray
    row_bags: np.ndarray
    row_offsets: np.ndarray


@dataclass(frozen=True)
class BatchPlan:
    """A batch's pull list and pooling indices, for every table of the config (even unused ones).

    Attributes:
        config: the model config it was planned for.
        batch_size: B.
        tables: table name -> its plan, in ``config.tables()`` order.
        counts: float32 [B, n_fields], fids per (sample, field); the DLRM bottom MLP's input.
    """

    config: ModelConfig
    batch_size: int
    tables: dict[str, TablePlan]
    counts: np.ndarray


def _group(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray | None, np.ndarray]:
    """A stable order grouping ``keys`` (None when already sorted) and each key's start offset [n_keys]."""
    order = None if bool((keys[1:] >= keys[:-1]).all()) else np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=n_keys)
    return order, np.cumsum(counts) - counts


def plan(fids: np.ndarray, lengths: np.ndarray, config: ModelConfig) -> BatchPlan:
    """Plans a batch in the lengths + values layout: sample ``i`` owns a contiguous run of ``lengths[i]`` fids.

    One sort of all fids gives every table's distinct fids and the by-row grouping (sort + diff;
    ``np.unique`` is slower and gives no grouping). The by-bag grouping needs no sort when each
    sample lists its fids in field order, as ``freshet.fids.example_fids`` does.

    Args:
        fids: int64 [T], non-negative.
        lengths: int [B], summing to T.
        config: the model config.

    Raises:
        ValueError: lengths do not add up to T, or a fid is negative.
    """
    fids = np.ascontiguousarray(fids, np.int64)
    lengths = np.asarray(lengths)
    n, total = len(lengths), len(fids)
    if (lengths < 0).any() or int(lengths.sum()) != total:
        raise ValueError(f"{n} lengths summing to {int(lengths.sum())} for {total} fids")
    if total and int(fids.min()) < 0:
        raise ValueError("fids must be non-negative")
    samples = np.repeat(np.arange(n, dtype=np.int64), lengths)
    slots = fids >> VALUE_BITS
    fields = config._slot_field[slots]
    counts = np.bincount(samples * config.n_fields + fields, minlength=n * config.n_fields)
    counts = counts.astype(np.float32).reshape(n, config.n_fields)
    if config.kind == "lr":
        bags = samples
    elif len(config._table_fields) == 1:  # one table holds every field: a field's position is its index
        bags = samples * config.n_fields + fields
    else:
        bags = samples * config._slot_bag_k[slots] + config._slot_position[slots]

    # torch's stable (radix) sort of int64 beats numpy's argsort; cumsum to int32 avoids numpy's slow bool->int64.
    # (A read-only array, e.g. one decoded from a message, is copied: torch cannot wrap it.)
    ordered_t, order_t = torch.sort(torch.from_numpy(fids if fids.flags.writeable else fids.copy()), stable=True)
    ordered, order = ordered_t.numpy(), order_t.numpy()
    starts = np.empty(total, bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    unique = ordered[starts]
    ids = np.cumsum(starts, dtype=np.int32)
    ids -= 1
    inverse = np.empty(total, np.int64)
    inverse[order] = ids

    names = config.tables()
    if len(names) == 1:
        parts = [(unique, inverse, samples, fields, bags, bags[order], np.flatnonzero(starts))]
    else:
        # Partition distinct fids, occurrences, and fid-sorted occurrences by table with stable radix
        # sorts of int16 keys: fids stay sorted within each table, occurrences keep their order.
        table_of_unique = config._slot_table[unique >> VALUE_BITS].astype(np.int16)
        u_order = np.argsort(table_of_unique, kind="stable")
        u_counts = np.bincount(table_of_unique, minlength=len(names))
        local = np.empty(len(unique), np.int64)  # rank of each distinct fid within its table
        local[u_order] = np.arange(len(unique)) - np.repeat(np.cumsum(u_counts) - u_counts, u_counts)
        table_of_occ = table_of_unique[inverse]
        o_order = np.argsort(table_of_occ, kind="stable")
        s_order = order[np.argsort(table_of_unique[ids], kind="stable")]  # by table, then fid
        o_bounds = np.concatenate(([0], np.cumsum(np.bincount(table_of_occ, minlength=len(names)))))
        u_bounds = np.concatenate(([0], np.cumsum(u_counts)))
        o_arrays = local[inverse][o_order], samples[o_order], fields[o_order], bags[o_order]
        parts = []
        for t in range(len(names)):
            o, u = slice(o_bounds[t], o_bounds[t + 1]), slice(u_bounds[t], u_bounds[t + 1])
            by_row = s_order[o]
            row_starts = np.flatnonzero(np.diff(inverse[by_row], prepend=-1))
            parts.append((unique[u_order[u]], *(a[o] for a in o_arrays), bags[by_row], row_starts))

    out: dict[str, TablePlan] = {}
    for t, (name, width) in enumerate(names.items()):
        t_unique, t_rows, t_samples, t_fields, t_bags, row_bags, row_offsets = parts[t]
        table_fields = config._table_fields[t]
        by_bag, bag_offsets = _group(t_bags, n * max(1, len(table_fields)))
        out[name] = TablePlan(
            name=name,
            width=width,
            fids=t_unique,
            rows=t_rows,
            samples=t_samples,
            fields=t_fields,
            bags=t_bags,
            table_fields=table_fields,
            bag_rows=t_rows if by_bag is None else t_rows[by_bag],
            bag_offsets=bag_offsets,
            row_bags=row_bags,
            row_offsets=row_offsets,
        )
    return BatchPlan(config, n, out, counts)


class _BagSum(torch.autograd.Function):
    """out[b] = sum of rows[r] over the occurrences (b, r); both directions are one ``embedding_bag``.

    torch's own backward of ``embedding_bag`` sorts the indices, and index_select + index_add
    scatter twice (~3x slower at 160k fids); the plan already holds the occurrences grouped by row,
    so the backward is the same gather-and-sum as the forward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        bag_rows: torch.Tensor,
        bag_offsets: torch.Tensor,
        row_bags: torch.Tensor,
        row_offsets: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(row_bags, row_offsets)
        ctx.n_rows = rows.shape[0]
        if len(bag_offsets) == 0:
            return rows.new_zeros(0, rows.shape[1])
        return F.embedding_bag(bag_rows, rows, bag_offsets, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        row_bags, row_offsets = ctx.saved_tensors
        if ctx.n_rows == 0:
            return grad.new_zeros(0, grad.shape[1]), None, None, None, None
        return F.embedding_bag(row_bags, grad.contiguous(), row_offsets, mode="sum"), None, None, None, None


@dataclass
class Pooled:
    """Pooled sparse features of a batch, the dense model's input.

    Attributes:
        linear: float32 [B], the sum of the first-order weights of the sample's fids (zeros for DLRM).
        fields: per field ("other" last), float32 [B, d_f], the sum of its fids' vectors (zeros when
            the sample has none); empty for LR.
        counts: float32 [B, n_fields], fids per (sample, field).
    """

    linear: torch.Tensor
    fields: list[torch.Tensor]
    counts: torch.Tensor


def _split(config: ModelConfig, n: int, sums: list[torch.Tensor], counts: torch.Tensor) -> Pooled:
    """Pooled from per-table bag sums [n * k_t, width] (bag = sample * k_t + field position)."""
    linear = None
    fields: list[torch.Tensor] = [counts] * len(config.field_dims)  # placeholders, each set below
    for table_sums, table_fields in zip(sums, config._table_fields, strict=True):
        per_bag = table_sums.view(n, max(1, len(table_fields)), table_sums.shape[1])
        if config.has_linear:
            part = per_bag[:, :, 0].sum(dim=1)
            linear = part if linear is None else linear + part
            per_bag = per_bag[:, :, 1:]
        for j, f in enumerate(table_fields):
            fields[f] = per_bag[:, j, :]
    if linear is None:
        linear = torch.zeros(n, dtype=counts.dtype, device=counts.device)
    return Pooled(linear, fields, counts)


def pool(batch: BatchPlan, rows: Mapping[str, torch.Tensor]) -> Pooled:
    """Sum-pools pulled rows per sample and field; gradients flow back to ``rows``.

    Args:
        batch: the batch's plan.
        rows: table name -> float32 [U_t, width_t], the rows of ``batch.tables[name].fids`` in order.
    """
    sums = []
    device = next(iter(rows.values())).device
    for name, tp in batch.tables.items():
        table_rows = rows[name]
        if table_rows.shape != (len(tp.fids), tp.width):
            raise ValueError(
                f"rows of table {name!r}: shape {tuple(table_rows.shape)}, expected ({len(tp.fids)}, {tp.width})"
            )
        index = [
            torch.from_numpy(a).to(device) for a in (tp.bag_rows, tp.bag_offsets, tp.row_bags, tp.row_offsets)
        ]
        sums.append(_BagSum.apply(table_rows, *index))
    counts = torch.from_numpy(batch.counts).to(device=device, dtype=sums[0].dtype)
    return _split(batch.config, batch.batch_size, sums, counts)


class StaticEmbeddings(nn.Module):
    """The in-process baseline: one ``nn.EmbeddingBag(mode="sum")`` per store table, ``fid % rows`` hashed.

    Produces the same ``Pooled`` as ``pool(plan(...), rows)`` would for the same row values, so a
    ``CtrModel`` trains unchanged on it (with collisions between fids that share ``fid % rows``).
    Rows start uniform in [-init_scale, init_scale], every column, as the store's
    ``initial_values`` (``FRESHET_STORE_INIT_SCALE``, default 0.01).

    Args:
        config: the model config.
        num_rows: rows per table (one number for all, or per table name).
        init_scale: bound of the uniform initial values.
        sparse: sparse gradients (for ``torch.optim.Adagrad`` / ``SparseAdam``), as a large table needs.
        seed: seed of the initial values.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_rows: int | Mapping[str, int] = 1 << 20,
        init_scale: float = 0.01,
        sparse: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        self.bags = nn.ModuleList()
        for name, width in config.tables().items():
            n = num_rows if isinstance(num_rows, int) else num_rows[name]
            bag = nn.EmbeddingBag(n, width, mode="sum", sparse=sparse)
            with torch.no_grad():
                bag.weight.copy_((torch.rand(n, width, generator=gen) * 2 - 1) * init_scale)
            self.bags.append(bag)

    def bag(self, table: str) -> nn.EmbeddingBag:
        """The EmbeddingBag standing for store table ``table``."""
        return self.bags[list(self.config.tables()).index(table)]

    def forward(self, fids: np.ndarray, lengths: np.ndarray) -> Pooled:
        """Pools a batch in the lengths + values layout (fids int64 [T], lengths int [B])."""
        config = self.config
        fids = np.asarray(fids, np.int64)
        lengths = np.asarray(lengths)
        n = len(lengths)
        device = self.bags[0].weight.device
        samples = np.repeat(np.arange(n, dtype=np.int64), lengths)
        slots = fids >> VALUE_BITS
        counts = np.bincount(samples * config.n_fields + config._slot_field[slots], minlength=n * config.n_fields)
        bags = samples * config._slot_bag_k[slots] + config._slot_position[slots]
        tables = config._slot_table[slots]
        sums = []
        for t, bag in enumerate(self.bags):
            occ = slice(None) if len(self.bags) == 1 else tables == t
            t_fids, t_bags = fids[occ], bags[occ]
            n_bags = n * max(1, len(config._table_fields[t]))
            order, offsets = _group(t_bags, n_bags)  # EmbeddingBag needs each bag's fids contiguous
            ids = t_fids % bag.num_embeddings if order is None else t_fids[order] % bag.num_embeddings
            if n_bags:
                sums.append(bag(torch.from_numpy(ids).to(device), torch.from_numpy(offsets).to(device)))
            else:
                sums.append(bag.weight.new_zeros(0, bag.embedding_dim))
        counts_t = torch.from_numpy(counts.reshape(n, config.n_fields)).to(device=device, dtype=sums[0].dtype)
        return _split(config, n, sums, counts_t)


# -- the dense model -------------------------------------------------------------------------------------------


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int, final_relu: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    if final_relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CtrModel(nn.Module):
    """The dense part of a CTR model: pooled sparse features -> logits [B, n_tasks].

    - lr:     bias + linear
    - fm:     bias + linear + FM over the field vectors, 0.5 * sum_k ((sum_f v_fk)^2 - sum_f v_fk^2)
    - deepfm: linear + FM (fields of another dim projected to ``dim``) + MLP(concat of field vectors)
    - dlrm:   top MLP(concat(bottom output if any, dots of every pair of vectors)), the vectors being
              [bottom output,] fields projected to ``dim``; pairs (i, j), i > j, in row-major order.

    Multi-task (DeepFM, DLRM): the last MLP layer has one output per task; DeepFM's linear + FM part
    is shared and added to every task's logit (it is the part that learns fastest online).

    Args:
        config: the model config.
        seed: seeds the dense initialisation (without touching the global RNG); None uses the global RNG.
    """

    def __init__(self, config: ModelConfig, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        if seed is None:
            self._build(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(config)

    def _build(self, config: ModelConfig) -> None:
        n_tasks, dim, dims = len(config.tasks), config.dim, config.field_dims
        if config.kind in ("lr", "fm"):
            self.bias = nn.Parameter(torch.zeros(n_tasks))
        if config.kind in ("deepfm", "dlrm"):
            self.proj = nn.ModuleList(nn.Identity() if d == dim else nn.Linear(d, dim, bias=False) for d in dims)
        if config.kind == "deepfm":
            self.deep = _mlp(sum(dims), config.deep, n_tasks)
        if config.kind == "dlrm":
            self.bottom = _mlp(config.n_fields, config.bottom, dim, final_relu=True) if config.bottom else None
            m = config.n_fields + (1 if config.bottom else 0)
            rows, cols = torch.tril_indices(m, m, offset=-1)
            self.register_buffer("_pair_rows", rows, persistent=False)
            self.register_buffer("_pair_cols", cols, persistent=False)
            self.top = _mlp(len(rows) + (dim if config.bottom else 0), config.top, n_tasks)

    @staticmethod
    def _fm(vectors: torch.Tensor) -> torch.Tensor:
        """[B, F, d] -> [B, 1], the FM pairwise term."""
        total = vectors.sum(dim=1)
        return 0.5 * (total * total - (vectors * vectors).sum(dim=1)).sum(dim=1, keepdim=True)

    def forward(self, pooled: Pooled) -> torch.Tensor:
        """Logits float32 [B, n_tasks] of pooled features."""
        kind = self.config.kind
        linear = pooled.linear[:, None]
        if kind == "lr":
            return self.bias + linear
        if kind == "fm":
            return self.bias + linear + self._fm(torch.stack(pooled.fields, dim=1))
        projected = torch.stack([p(f) for p, f in zip(self.proj, pooled.fields, strict=True)], dim=1)
        if kind == "deepfm":
            return linear + self._fm(projected) + self.deep(torch.cat(pooled.fields, dim=1))
        if self.bottom is not None:
            dense = self.bottom(torch.log1p(pooled.counts))
            projected = torch.cat([dense[:, None, :], projected], dim=1)
        dots = torch.bmm(projected, projected.transpose(1, 2))[:, self._pair_rows, self._pair_cols]
        return self.top(torch.cat([dense, dots], dim=1) if self.bottom is not None else dots)


def loss(
    logits: torch.Tensor,
    label_vectors: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    tasks: Sequence[str],
) -> torch.Tensor:
    """Weighted BCE with logits, SUMMED over samples and tasks.

    Summed, not averaged, so each sample's gradient counts the same whatever the batch size; the
    per-sample weight undoes negative down-sampling (a weight-0 sample contributes nothing).

    Args:
        logits: float32 [B, n_tasks].
        label_vectors: float32 [B, 4], ``[click, like, share, dwell_s]``.
        weights: float32 [B], or [B, n_tasks] to weigh each task of each sample on its own.
        tasks: the task names, in logit column order (``ModelConfig.tasks``).
    """
    columns = [TASKS.index(t) for t in tasks]
    if isinstance(
        label_vectors, np.ndarray
    ):  # select in numpy: a writable copy, even of a decoded read-only batch
        label_vectors = label_vectors[:, columns]
        columns = slice(None)
    labels = torch.as_tensor(label_vectors, device=logits.device)[:, columns].to(logits.dtype)
    weights = torch.as_tensor(weights, device=logits.device).to(logits.dtype)
    per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per_task * (weights if weights.dim() == 2 else weights[:, None])).sum()


def model_from_setting(text: str) -> ModelConfig:
    """The model of a ``FRESHET_MODEL_CONFIG`` value: empty (the default model), JSON, or ``@<path>`` of a JSON file.

    The trainer and the predictor read the same variable, so they build the same network.
    """
    text = text.strip()
    if not text:
        return ModelConfig()
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ValueError(f"FRESHET_MODEL_CONFIG names {path}, which is not a file")
        text = path.read_text()
    return ModelConfig.from_json(text)
