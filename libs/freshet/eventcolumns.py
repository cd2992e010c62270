"""Events as columns: the ``EventColumns`` wire form, its numpy view and vectorised schema checks.

An ``EventBatch`` carries one nested message per event, and reading one costs a protobuf object per
field access (~1.6 µs per event in Python). ``EventColumns`` carries each field as one ``Tensor`` for
all events of the message, so decoding is one ``np.frombuffer`` per column; request ids and
impression contexts, which repeat across events, travel once each in tables that the events index.

Every event source of the joiner ends up as an ``EventColumns`` (``decode_event_columns`` for
``events.columns.<p>``, ``columns_of_events`` for row batches and single events), so the joiner has
one path; ``row_problems`` finds schema violations for the whole message with a few numpy passes,
and ``row_event`` rebuilds one event as an ``Event`` protobuf for its dead-letter entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from freshet.events.v1 import events_pb2
from freshet.tensors import from_tensor, to_tensor

KIND_IMPRESSION = 1
KIND_ACTION = 2

Context = tuple[tuple[str, str], ...]  # (name, value) pairs sorted by name
ProtoEvent = events_pb2.Impression | events_pb2.Action

# The valid action types are 1..N in protobuf enum order; the reason text names them as the joiner does.
_ACTION_TYPE_NAMES = [
    name.removeprefix("ACTION_TYPE_") for name, number in sorted(events_pb2.ActionType.items(), key=lambda x: x[1])
][1:]
_MAX_ACTION_TYPE = len(_ACTION_TYPE_NAMES)

# (field, dtype) of every per-event column, in wire order.
_COLUMNS = (
    ("kinds", np.dtype("i1")),
    ("request_index", np.dtype("<i4")),
    ("item_ids", np.dtype("<i8")),
    ("user_ids", np.dtype("<i8")),
    ("positions", np.dtype("<i4")),
    ("event_time_ms", np.dtype("<i8")),
    ("action_types", np.dtype("i1")),
    ("values", np.dtype("<f8")),
    ("context_index", np.dtype("<i4")),
)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


_EMPTY = {name: _read_only(np.zeros(0, dtype)) for name, dtype in _COLUMNS}


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no truth value, compare them field by field
class EventColumns:
    """The events of one message as columns: entry i of every array is event i (``n`` events).

    Arrays are read-only (decoded ones are views on the message's bytes).

    Attributes:
        kinds: int8 [n]: ``KIND_IMPRESSION``, ``KIND_ACTION``, anything else is an invalid entry.
        request_index: int32 [n]: index into ``request_ids``.
        request_ids: the distinct request ids, in first-seen order.
        item_ids: int64 [n].
        user_ids: int64 [n] (0 for actions).
        positions: int32 [n] (0 for actions).
        event_time_ms: int64 [n], client clock.
        action_types: int8 [n], ``ActionType`` (0 for impressions).
        values: float64 [n], ``Action.value`` (0 for impressions).
        context_index: int32 [n]: index into ``contexts``, -1 for no context.
        contexts: the distinct impression contexts, in first-seen order, each sorted by name.
    """

    kinds: np.ndarray
    request_index: np.ndarray
    request_ids: list[str]
    item_ids: np.ndarray
    user_ids: np.ndarray
    positions: np.ndarray
    event_time_ms: np.ndarray
    action_types: np.ndarray
    values: np.ndarray
    context_index: np.ndarray
    contexts: list[Context]

    def __len__(self) -> int:
        return len(self.kinds)

    def take(self, keep: np.ndarray) -> EventColumns:
        """The events where ``keep`` is true (the request and context tables stay as they are)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[keep] for name, _ in _COLUMNS})


def context_pairs(context) -> Context:
    """A protobuf context map as sorted (name, value) pairs (most events have none or one)."""
    n = len(context)
    if n == 0:
        return ()
    if n == 1:
        for name in context:
            return ((name, context[name]),)
    return tuple(sorted(context.items()))


def _columns(events: Iterable[ProtoEvent | None], allow_none: bool) -> EventColumns:
    requests: dict[str, int] = {}
    contexts: dict[Context, int] = {}
    # One tuple per event, transposed at the end: cheaper than nine appends per event.
    rows: list[tuple] = []
    append = rows.append
    for event in events:
        if isinstance(event, events_pb2.Impression):
            request = requests.setdefault(event.request_id, len(requests))
            context = event.context
            ctx = contexts.setdefault(context_pairs(context), len(contexts)) if context else -1
            append(
                (
                    KIND_IMPRESSION,
                    request,
                    event.item_id,
                    event.user_id,
                    event.position,
                    event.event_time_ms,
                    0,
                    0.0,
                    ctx,
                )
            )
        elif isinstance(event, events_pb2.Action):
            request = requests.setdefault(event.request_id, len(requests))
            append((KIND_ACTION, request, event.item_id, 0, 0, event.event_time_ms, event.type, event.value, -1))
        elif event is None and allow_none:
            # A row batch's entry with neither kind: kind 0, so row_problems names it; its request is "".
            append((0, requests.setdefault("", len(requests)), 0, 0, 0, 0, 0, 0.0, -1))
        else:
            raise TypeError(f"not an Impression or Action: {type(event).__name__}")
    if not rows:
        arrays = dict(_EMPTY)
    else:
        transposed = list(zip(*rows, strict=True))
        # proto3 enums are open: a type beyond int8 saturates, stays invalid and is rejected as one.
        transposed[6] = np.clip(np.array(transposed[6], np.int64), -128, 127)
        arrays = {
            name: _read_only(np.array(column, dtype))
            for (name, dtype), column in zip(_COLUMNS, transposed, strict=True)
        }
    return EventColumns(request_ids=list(requests), contexts=list(contexts), **arrays)


def columns_of_events(events: Sequence[ProtoEvent | None]) -> EventColumns:
    """Events as columns, as ``decode_event_columns(encode_event_columns(events))`` would give them.

    ``None`` (a row batch's entry with neither kind set) becomes an entry of kind 0 that ``row_problems``
    reports. For the joiner's row batches and single events, so every source shares one path.

    Raises:
        TypeError: an entry is neither an ``Impression``, an ``Action`` nor ``None``.
    """
    return _columns(events, allow_none=True)


def encode_event_columns(events: Iterable[ProtoEvent]) -> bytes:
    """Serialises events, in order, as one ``EventColumns`` message.

    Raises:
        TypeError: an entry is neither an ``Impression`` nor an ``Action``.
    """
    columns = _columns(events, allow_none=False)
    msg = events_pb2.EventColumns(
        request_ids=columns.request_ids, **{name: to_tensor(getattr(columns, name)) for name, _ in _COLUMNS}
    )
    for context in columns.contexts:
        msg.contexts.add(names=[name for name, _ in context], values=[value for _, value in context])
    return msg.SerializeToString()


def _check_index(index: np.ndarray, name: str, table: str, size: int, lowest: int) -> None:
    """Raises ``ValueError`` naming the first entry of ``index`` outside ``lowest .. size - 1``."""
    # As uint32, index - lowest wraps entries below lowest past any table size: one reduction checks both ends.
    shifted = index if lowest == 0 else index - np.int32(lowest)
    if len(index) and shifted.view(np.uint32).max() >= size - lowest:
        bad = int(np.flatnonzero((index < lowest) | (index >= size))[0])
        raise ValueError(f"{name} out of range: entry {bad} is {index[bad]}, {table} has {size} entries")


def decode_event_columns(data: bytes) -> EventColumns:
    """The events of an ``EventColumns`` message; a message with no columns set holds 0 events.

    Raises:
        ValueError: naming the problem: undecodable bytes, a column of the wrong dtype or rank
            (``freshet.tensors.TensorError``), columns of different lengths, a request or context
            index out of range, or a context whose names and values differ in length.
    """
    try:
        msg = events_pb2.EventColumns.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"cannot decode EventColumns: {exc}") from None
    arrays = {
        name: from_tensor(getattr(msg, name), dtype, 1, name) if msg.HasField(name) else _EMPTY[name]
        for name, dtype in _COLUMNS
    }
    n = len(arrays["kinds"])
    for name, array in arrays.items():
        if len(array) != n:
            absent = "" if msg.HasField(name) else " (absent)"
            raise ValueError(
                f"columns of different lengths: kinds has {n} entries, {name} has {len(array)}{absent}"
            )
    request_ids = list(msg.request_ids)
    _check_index(arrays["request_index"], "request_index", "request_ids", len(request_ids), 0)
    contexts: list[Context] = []
    for j, context in enumerate(msg.contexts):
        names, values = context.names, context.values
        if len(names) != len(values):
            raise ValueError(f"context {j} has {len(names)} names but {len(values)} values")
        pairs = tuple(zip(names, values, strict=True))
        if len(pairs) > 1 and list(names) != sorted(names):
            pairs = tuple(sorted(pairs))  # a producer that did not sort: the joiner relies on the order
        contexts.append(pairs)
    _check_index(arrays["context_index"], "context_index", "contexts", len(contexts), -1)
    return EventColumns(request_ids=request_ids, contexts=contexts, **arrays)


def row_problems(columns: EventColumns) -> list[tuple[int, str]]:
    """(index, reason) of every event that violates the schema, in order; empty when all are valid.

    The rules, checked in this order (the first failing one gives the reason): an impression needs a
    request id, non-negative user and item ids and a non-negative position; an action needs a request id,
    a non-negative item id and a type in 1..N (0 is "unspecified").
    """
    kinds = columns.kinds
    if not len(kinds):
        return []
    item_ok = columns.item_ids >= 0
    # The bitwise or of integers is negative iff one of them is.
    impression_ok = (kinds == KIND_IMPRESSION) & item_ok & ((columns.user_ids | columns.positions) >= 0)
    # As uint8, type - 1 wraps 0 and negative types past the valid range: one comparison for 1..N.
    type_ok = columns.action_types.view(np.uint8) - np.uint8(1) < _MAX_ACTION_TYPE
    ok = impression_ok | ((kinds == KIND_ACTION) & item_ok & type_ok)
    if "" in columns.request_ids:  # deduplicated: at most one entry of the table is empty
        ok &= columns.request_index != columns.request_ids.index("")
    if ok.all():
        return []
    return [(i, _reason(columns, i)) for i in np.flatnonzero(~ok).tolist()]


def _reason(columns: EventColumns, i: int) -> str:
    kind = int(columns.kinds[i])
    if kind not in (KIND_IMPRESSION, KIND_ACTION):
        return "batch entry is neither an impression nor an action"
    missing_request = not columns.request_ids[columns.request_index[i]]
    item = int(columns.item_ids[i])
    if kind == KIND_IMPRESSION:
        user, position = int(columns.user_ids[i]), int(columns.positions[i])
        if missing_request:
            return "impression without request_id"
        if user < 0 or item < 0:
            return f"negative id (user {user}, item {item})"
        return f"negative position {position}"
    action_type = int(columns.action_types[i])
    if missing_request:
        return "action without request_id"
    if item < 0:
        return f"negative item id {item}"
    if action_type == 0:
        return "action type unspecified"
    return f"action type {action_type} is not one of {_ACTION_TYPE_NAMES}"


def row_event(columns: EventColumns, i: int) -> bytes:
    """Event ``i`` as a serialized ``Event`` protobuf, for its dead-letter entry.

    An entry of another kind than impression or action gives an ``Event`` with neither set (``b""``).
    """
    kind = int(columns.kinds[i])
    request_id = columns.request_ids[columns.request_index[i]]
    if kind == KIND_IMPRESSION:
        impression = events_pb2.Impression(
            request_id=request_id,
            user_id=int(columns.user_ids[i]),
            item_id=int(columns.item_ids[i]),
            position=int(columns.positions[i]),
            event_time_ms=int(columns.event_time_ms[i]),
        )
        context = int(columns.context_index[i])
        if context >= 0:
            impression.context.update(columns.contexts[context])
        return events_pb2.Event(impression=impression).SerializeToString()
    if kind == KIND_ACTION:
        action = events_pb2.Action(
            request_id=request_id,
            item_id=int(columns.item_ids[i]),
            type=int(columns.action_types[i]),
            value=float(columns.values[i]),
            event_time_ms=int(columns.event_time_ms[i]),
        )
        return events_pb2.Event(action=action).SerializeToString()
    return events_pb2.Event().SerializeToString()
