"""Table and slot configuration of the embedding store (dataclasses, loadable from JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from services.store.admission import CountAdmissionConfig, ProbabilisticAdmissionConfig
from services.store.optimizers import AdagradConfig, OptimizerConfig, optimizer_from_dict

AdmissionConfig = CountAdmissionConfig | ProbabilisticAdmissionConfig


@dataclass(frozen=True)
class SlotPolicy:
    """Per-slot policy: which fids get a row, and how long an unseen row is kept.

    Attributes:
        admission: ``None`` admits every fid at its first gradient; otherwise the filter a fid
            must pass first (until then it reads the initial value and its gradients are dropped).
        ttl_s: rows of this slot not seen for this many seconds are evicted (``None``: never).
    """

    admission: AdmissionConfig | None = None
    ttl_s: float | None = None


@dataclass(frozen=True)
class TableSpec:
    """One embedding table.

    Attributes:
        name: table name on the wire.
        dim: floats per row value.
        optimizer: the server-side sparse optimizer.
        init_scale: new rows start uniform in [-init_scale, init_scale], derived from the fid.
        seed: mixes into the initial values.
        slots: policies of specific slots (the fid's high bits), others use ``default_policy``.
        default_policy: policy of slots not in ``slots``.
        host_capacity: max rows in host memory; beyond it the least valuable rows are demoted to
            RocksDB (needs a data dir). ``None``: unbounded.
        demotion: ``lfu`` (lowest frequency first) or ``lru`` (least recently seen first).
        device_cache_rows: rows of the hottest fids mirrored in the device cache (0: off).
        initial_rows: host rows allocated up front (the slab grows by 1/8 beyond): size it to the
            expected id count to avoid growth copies and slack.
    """

    name: str
    dim: int
    optimizer: OptimizerConfig = field(default_factory=AdagradConfig)
    init_scale: float = 0.01
    seed: int = 0
    slots: dict[int, SlotPolicy] = field(default_factory=dict)
    default_policy: SlotPolicy = field(default_factory=SlotPolicy)
    host_capacity: int | None = None
    demotion: str = "lfu"
    device_cache_rows: int = 0
    initial_rows: int = 1024

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"table {self.name!r}: dim must be positive, got {self.dim}")
        if self.demotion not in ("lfu", "lru"):
            raise ValueError(f"table {self.name!r}: demotion must be 'lfu' or 'lru', got {self.demotion!r}")
        if self.host_capacity is not None and self.host_capacity <= 0:
            raise ValueError(f"table {self.name!r}: host_capacity must be positive")

    def policy(self, slot: int) -> SlotPolicy:
        return self.slots.get(slot, self.default_policy)


def _admission_from_dict(d: dict[str, Any] | None) -> AdmissionConfig | None:
    if d is None:
        return None
    d = dict(d)
    kind = d.pop("kind", None)
    kinds = {"count": CountAdmissionConfig, "probabilistic": ProbabilisticAdmissionConfig}
    if kind in kinds:
        unknown = set(d) - set(kinds[kind].__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} for {kind} admission")
        return kinds[kind](**d)
    raise ValueError(f"admission kind must be 'count' or 'probabilistic', got {kind!r}")


def _policy_from_dict(d: dict[str, Any]) -> SlotPolicy:
    unknown = set(d) - {"admission", "ttl_s"}
    if unknown:
        raise ValueError(f"unknown slot policy keys {sorted(unknown)}")
    return SlotPolicy(admission=_admission_from_dict(d.get("admission")), ttl_s=d.get("ttl_s"))


def table_from_dict(d: dict[str, Any]) -> TableSpec:
    """A table spec from JSON-like data, e.g.::

        {"name": "fm", "dim": 9, "optimizer": {"name": "adagrad", "learning_rate": 0.2},
         "default_policy": {"admission": {"kind": "count", "min_count": 2}, "ttl_s": 86400},
         "slots": {"1": {"ttl_s": 3600}}, "host_capacity": 1000000, "demotion": "lfu"}

    Raises:
        ValueError: unknown keys or values, naming them.
    """
    d = dict(d)
    known = {f for f in TableSpec.__dataclass_fields__}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"table {d.get('name')!r}: unknown keys {sorted(unknown)}")
    if "optimizer" in d:
        d["optimizer"] = optimizer_from_dict(d["optimizer"])
    if "default_policy" in d:
        d["default_policy"] = _policy_from_dict(d["default_policy"])
    if "slots" in d:
        d["slots"] = {int(slot): _policy_from_dict(p) for slot, p in d["slots"].items()}
    return TableSpec(**d)


def tables_from_json(text: str) -> list[TableSpec]:
    """Table specs from a JSON list of objects (see ``table_from_dict``)."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("table config must be a JSON list of table objects")
    return [table_from_dict(item) for item in data]
