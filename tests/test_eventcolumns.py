"""Events as columns: lossless round trips, one result for every source, precise errors for malformed
messages, and the joiner's schema reasons computed on whole columns (the publisher: integration/test_event_publisher.py)."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.eventcolumns import (
    KIND_ACTION,
    KIND_IMPRESSION,
    EventColumns,
    columns_of_events,
    decode_event_columns,
    encode_event_columns,
    row_event,
    row_problems,
)
from freshet.events.v1 import events_pb2
from freshet.tensors import TensorError, to_tensor
from services.joiner.joinstate import ActionType
from tests.event_rules import validate_action, validate_impression

_ARRAYS = {
    "kinds": np.int8,
    "request_index": np.int32,
    "item_ids": np.int64,
    "user_ids": np.int64,
    "positions": np.int32,
    "event_time_ms": np.int64,
    "action_types": np.int8,
    "values": np.float64,
    "context_index": np.int32,
}
# Contexts with no, one and several keys; the several-key ones deliberately not in name order.
_CONTEXTS = [{}, {"device": "ios"}, {"device": "web"}, {"region": "eu", "device": "ios", "age": "30s"}]


def _impression(request_id="r1", user_id=7, item_id=11, position=0, time_ms=1_000, context=None):
    return events_pb2.Impression(
        request_id=request_id,
        user_id=user_id,
        item_id=item_id,
        position=position,
        event_time_ms=time_ms,
        context=context or {},
    )


def _action(request_id="r1", item_id=11, action_type=events_pb2.ACTION_TYPE_CLICK, value=1.0, time_ms=2_000):
    return events_pb2.Action(
        request_id=request_id, item_id=item_id, type=action_type, value=value, event_time_ms=time_ms
    )


def _valid_events(rng: np.random.Generator, n: int) -> list[events_pb2.Impression | events_pb2.Action]:
    """Mixed valid events over a few requests (so ids repeat), with every kind of context."""
    events = []
    for _ in range(n):
        request_id = f"req-{rng.integers(0, n // 4 + 1)}"
        time_ms = int(rng.integers(1_700_000_000_000, 1_700_000_100_000))
        if rng.random() < 0.6:
            events.append(
                _impression(
                    request_id,
                    int(rng.integers(0, 2**62)),
                    int(rng.integers(0, 2**62)),
                    int(rng.integers(0, 50)),
                    time_ms,
                    _CONTEXTS[rng.integers(0, len(_CONTEXTS))],
                )
            )
        else:
            events.append(
                _action(
                    request_id, int(rng.integers(0, 2**62)), int(rng.integers(1, 5)), float(rng.random()), time_ms
                )
            )
    return events


def _assert_same_columns(got: EventColumns, want: EventColumns) -> None:
    for name, dtype in _ARRAYS.items():
        assert getattr(got, name).dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.request_ids == want.request_ids
    assert got.contexts == want.contexts


def test_mixed_events_round_trip_field_by_field_with_their_contexts():
    events = _valid_events(np.random.default_rng(1), 300)
    assert {len(e.context) for e in events if isinstance(e, events_pb2.Impression)} == {0, 1, 3}

    columns = decode_event_columns(encode_event_columns(events))

    assert len(columns) == len(events)
    for i, event in enumerate(events):
        assert columns.request_ids[columns.request_index[i]] == event.request_id
        assert columns.item_ids[i] == event.item_id
        assert columns.event_time_ms[i] == event.event_time_ms
        if isinstance(event, events_pb2.Impression):
            assert columns.kinds[i] == KIND_IMPRESSION
            assert (columns.user_ids[i], columns.positions[i]) == (event.user_id, event.position)
            assert (columns.action_types[i], columns.values[i]) == (0, 0.0)
            if event.context:
                assert columns.contexts[columns.context_index[i]] == tuple(sorted(event.context.items()))
            else:
                assert columns.context_index[i] == -1
        else:
            assert columns.kinds[i] == KIND_ACTION
            assert (columns.action_types[i], columns.values[i]) == (event.type, event.value)
            assert (columns.user_ids[i], columns.positions[i], columns.context_index[i]) == (0, 0, -1)
    assert row_problems(columns) == []


def test_request_ids_and_contexts_are_deduplicated_in_first_seen_order():
    events = [
        _impression("b", context={"z": "1", "a": "2"}),
        _impression("a", context={"a": "2", "z": "1"}),
        _action("b"),
        _impression("c"),
        _impression("a", context={"device": "web"}),
    ]

    columns = decode_event_columns(encode_event_columns(events))

    assert columns.request_ids == ["b", "a", "c"]
    assert columns.request_index.tolist() == [0, 1, 0, 2, 1]
    assert columns.contexts == [(("a", "2"), ("z", "1")), (("device", "web"),)]
    assert columns.context_index.tolist() == [0, 0, -1, -1, 1]


def test_columns_of_events_equal_decoding_the_encoded_message():
    events = _valid_events(np.random.default_rng(2), 200)

    _assert_same_columns(columns_of_events(events), decode_event_columns(encode_event_columns(events)))


def test_columns_of_events_give_a_row_batch_entry_with_neither_kind_kind_zero():
    columns = columns_of_events([_impression("r1"), None, _action("r1")])

    assert columns.kinds.tolist() == [KIND_IMPRESSION, 0, KIND_ACTION]
    assert row_problems(columns) == [(1, "batch entry is neither an impression nor an action")]
    assert events_pb2.Event.FromString(row_event(columns, 1)).WhichOneof("kind") is None


@pytest.mark.parametrize("events", [[], [_impression()]], ids=["empty", "one"])
def test_column_arrays_are_read_only(events):
    for columns in (columns_of_events(events), decode_event_columns(encode_event_columns(events))):
        for name in _ARRAYS:
            assert not getattr(columns, name).flags.writeable, name


@pytest.mark.parametrize("bad", [None, events_pb2.Event(), {"request_id": "r1"}], ids=["none", "event", "dict"])
def test_encoding_anything_but_impressions_and_actions_raises_type_error(bad):
    with pytest.raises(TypeError, match="not an Impression or Action"):
        encode_event_columns([_impression(), bad])


@pytest.mark.parametrize("data", [b"", encode_event_columns([])], ids=["no-columns", "zero-length-columns"])
def test_an_empty_message_is_a_batch_of_no_events(data):
    columns = decode_event_columns(data)

    assert len(columns) == 0
    assert (columns.request_ids, columns.contexts) == ([], [])
    assert all(getattr(columns, name).dtype == np.dtype(dtype) for name, dtype in _ARRAYS.items())
    assert row_problems(columns) == []


def _message(events=None) -> events_pb2.EventColumns:
    """A well-formed message as its proto, for tests to break."""
    events = events or [_impression("r1", context={"device": "ios"}), _action("r1"), _impression("r2")]
    return events_pb2.EventColumns.FromString(encode_event_columns(events))


def _wrong_dtype(msg):
    msg.kinds.CopyFrom(to_tensor(np.ones(3, np.int32)))


def _wrong_rank(msg):
    msg.item_ids.CopyFrom(to_tensor(np.ones((3, 1), np.int64)))


def _longer_column(msg):
    msg.values.CopyFrom(to_tensor(np.zeros(4, np.float64)))


def _absent_column(msg):
    msg.ClearField("positions")


def _request_index_too_large(msg):
    msg.request_index.CopyFrom(to_tensor(np.array([0, 1, 2], np.int32)))


def _request_index_negative(msg):
    msg.request_index.CopyFrom(to_tensor(np.array([0, -1, 1], np.int32)))


def _context_index_too_large(msg):
    msg.context_index.CopyFrom(to_tensor(np.array([0, -1, 1], np.int32)))


def _context_index_below_minus_one(msg):
    msg.context_index.CopyFrom(to_tensor(np.array([0, -1, -2], np.int32)))


def _context_names_and_values_differ(msg):
    msg.contexts[0].values.append("android")


@pytest.mark.parametrize(
    "breaks, error",
    [
        (_wrong_dtype, r"^kinds: expected dtype DTYPE_INT8, got DTYPE_INT32$"),
        (_wrong_rank, r"^item_ids: expected 1 dimensions, got shape \[3, 1\]$"),
        (_longer_column, r"^columns of different lengths: kinds has 3 entries, values has 4$"),
        (_absent_column, r"^columns of different lengths: kinds has 3 entries, positions has 0 \(absent\)$"),
        (_request_index_too_large, r"^request_index out of range: entry 2 is 2, request_ids has 2 entries$"),
        (_request_index_negative, r"^request_index out of range: entry 1 is -1, request_ids has 2 entries$"),
        (_context_index_too_large, r"^context_index out of range: entry 2 is 1, contexts has 1 entries$"),
        (_context_index_below_minus_one, r"^context_index out of range: entry 2 is -2, contexts has 1 entries$"),
        (_context_names_and_values_differ, r"^context 0 has 1 names but 2 values$"),
    ],
    ids=lambda x: getattr(x, "__name__", "")[1:] or None,
)
def test_malformed_messages_raise_value_error_naming_the_problem(breaks, error):
    msg = _message()
    breaks(msg)

    with pytest.raises(ValueError, match=error):
        decode_event_columns(msg.SerializeToString())


def test_a_column_of_the_wrong_dtype_raises_the_tensor_error():
    msg = _message()
    _wrong_dtype(msg)

    with pytest.raises(TensorError):
        decode_event_columns(msg.SerializeToString())


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05\x08"], ids=["bad-tag", "truncated"])
def test_undecodable_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match=r"^cannot decode EventColumns: "):
        decode_event_columns(data)


def test_a_context_not_sorted_by_name_on_the_wire_is_sorted_on_decoding():
    msg = _message()
    msg.contexts[0].names[:] = ["z", "a", "m"]
    msg.contexts[0].values[:] = ["1", "2", "3"]

    columns = decode_event_columns(msg.SerializeToString())

    assert columns.contexts == [(("a", "2"), ("m", "3"), ("z", "1"))]


_NAMES = ["CLICK", "LIKE", "SHARE", "DWELL"]


@pytest.mark.parametrize(
    "event, reason",
    [
        (_impression(request_id=""), "impression without request_id"),
        (_impression(user_id=-1), "negative id (user -1, item 11)"),
        (_impression(item_id=-5), "negative id (user 7, item -5)"),
        (_impression(position=-3), "negative position -3"),
        (_impression(request_id="", user_id=-1, position=-3), "impression without request_id"),
        (_impression(user_id=-1, position=-3), "negative id (user -1, item 11)"),
        (_action(request_id=""), "action without request_id"),
        (_action(item_id=-2), "negative item id -2"),
        (_action(action_type=0), "action type unspecified"),
        (_action(action_type=5), f"action type 5 is not one of {_NAMES}"),
        (_action(action_type=-4), f"action type -4 is not one of {_NAMES}"),
        (_action(request_id="", item_id=-2, action_type=0), "action without request_id"),
        (_action(item_id=-2, action_type=0), "negative item id -2"),
    ],
    ids=str,
)
def test_row_problems_give_the_first_failing_checks_reason(event, reason):
    events = [_impression("ok"), event, _action("ok")]

    assert row_problems(decode_event_columns(encode_event_columns(events))) == [(1, reason)]
    assert row_problems(columns_of_events(events)) == [(1, reason)]


@pytest.mark.parametrize("kind", [0, 3, -1], ids=str)
def test_row_problems_report_entries_of_an_unknown_kind(kind):
    msg = _message()
    msg.kinds.CopyFrom(to_tensor(np.array([1, kind, 1], np.int8)))

    columns = decode_event_columns(msg.SerializeToString())

    assert row_problems(columns) == [(1, "batch entry is neither an impression nor an action")]
    assert row_event(columns, 1) == b""


def test_row_problems_ignore_the_other_kinds_columns():
    # An action's user id and position, and an impression's action type, are not checked.
    msg = _message()
    msg.user_ids.CopyFrom(to_tensor(np.array([7, -1, 0], np.int64)))
    msg.positions.CopyFrom(to_tensor(np.array([0, -1, 0], np.int32)))
    msg.action_types.CopyFrom(to_tensor(np.array([0, 1, -9], np.int8)))

    assert row_problems(decode_event_columns(msg.SerializeToString())) == []


def test_an_action_type_beyond_int8_stays_invalid():
    columns = decode_event_columns(encode_event_columns([_action(action_type=1000), _action(action_type=-1000)]))

    assert columns.action_types.tolist() == [127, -128]
    assert row_problems(columns) == [
        (0, f"action type 127 is not one of {_NAMES}"),
        (1, f"action type -128 is not one of {_NAMES}"),
    ]


def _joiner_reason(event: events_pb2.Impression | events_pb2.Action | None) -> str | None:
    """The reason the joiner gives for one event (its single-event checks)."""
    if event is None:
        return "batch entry is neither an impression nor an action"
    if isinstance(event, events_pb2.Impression):
        return validate_impression(event)
    if reason := validate_action(event):
        return reason
    if event.type not in {int(t) for t in ActionType}:
        return f"action type {event.type} is not one of {[t.name for t in ActionType]}"
    return None


def _random_events(rng: np.random.Generator, n: int) -> list[events_pb2.Impression | events_pb2.Action | None]:
    """Events near every schema boundary: empty request ids, negative ids and positions, any small type."""

    def small() -> int:
        return int(rng.choice([-(2**40), -3, -1, 0, 1, 2, 2**40]))

    events = []
    for _ in range(n):
        request_id = str(rng.choice(["", "a", "b", "c"]))
        choice = rng.random()
        if choice < 0.45:
            context = _CONTEXTS[rng.integers(0, len(_CONTEXTS))]
            events.append(_impression(request_id, small(), small(), int(rng.integers(-2, 3)), small(), context))
        elif choice < 0.95:
            events.append(_action(request_id, small(), int(rng.integers(-6, 8)), float(rng.normal()), small()))
        else:
            events.append(None)
    return events


@pytest.mark.parametrize("seed", range(5))
def test_row_problems_agree_with_the_joiners_single_event_checks(seed):
    events = _random_events(np.random.default_rng(seed), 400)
    sent = [event for event in events if event is not None]  # what a columnar client can send

    def joiner_problems(events):
        return [(i, reason) for i, event in enumerate(events) if (reason := _joiner_reason(event))]

    assert 0 < len(joiner_problems(events)) < len(events)
    assert row_problems(columns_of_events(events)) == joiner_problems(events)
    assert row_problems(decode_event_columns(encode_event_columns(sent))) == joiner_problems(sent)


@pytest.mark.parametrize("seed", range(3))
def test_row_event_rebuilds_each_event_as_its_event_protobuf(seed):
    events = _random_events(np.random.default_rng(10 + seed), 200)
    columns = columns_of_events(events)
    decoded = decode_event_columns(encode_event_columns([e for e in events if e is not None]))

    rebuilt = [events_pb2.Event.FromString(row_event(columns, i)) for i in range(len(events))]

    for event, back in zip(events, rebuilt, strict=True):
        if event is None:
            assert back.WhichOneof("kind") is None
        elif isinstance(event, events_pb2.Impression):
            assert back.impression == event
        else:
            assert back.action == event
    assert [row_event(decoded, i) for i in range(len(decoded))] == [
        row_event(columns, i) for i, e in enumerate(events) if e is not None
    ]
