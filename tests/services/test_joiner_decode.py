"""The joiner's decoding of event messages: every form gives the valid events as columns, a reason for the rest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freshet import bus
from freshet.eventcolumns import columns_of_events, encode_event_columns
from freshet.events.v1 import events_pb2
from services.joiner.service import message_events
from tests.event_rules import validate_action, validate_impression

_text = st.sampled_from(["", "r1", "é", "r2"])
_int = st.integers(-2, 3)

impressions = st.builds(
    events_pb2.Impression,
    request_id=_text,
    user_id=_int,
    item_id=_int,
    position=_int,
    event_time_ms=st.integers(-(2**40), 2**40),
    context=st.dictionaries(
        st.sampled_from(["device", "os", "a"]), st.sampled_from(["", "ios", "web"]), max_size=3
    ),
)
actions = st.builds(
    events_pb2.Action,
    request_id=_text,
    item_id=_int,
    type=st.integers(0, 6),  # 0 is unspecified, 5 and 6 unknown to this code
    value=st.floats(allow_nan=False),
    event_time_ms=st.integers(-(2**40), 2**40),
)
entries = st.lists(
    st.one_of(
        impressions.map(lambda m: events_pb2.Event(impression=m)),
        actions.map(lambda m: events_pb2.Event(action=m)),
        st.just(events_pb2.Event()),
    ),
    max_size=12,
)


def reference(entries: list) -> tuple[list, list[tuple[int, str]]]:
    """(index, event) of every valid entry and (index, reason) of every other, checked one by one."""
    events, bad = [], []
    for index, entry in enumerate(entries):
        which = entry.WhichOneof("kind")
        if which is None:
            bad.append((index, "batch entry is neither an impression nor an action"))
            continue
        event = getattr(entry, which)
        reason = validate_impression(event) if which == "impression" else validate_action(event)
        if reason is None and which == "action" and event.type not in range(1, 5):
            reason = f"action type {event.type} is not one of ['CLICK', 'LIKE', 'SHARE', 'DWELL']"
        if reason is None:
            events.append((index, event))
        else:
            bad.append((index, reason))
    return events, bad


def as_rows(columns) -> list[tuple]:
    """Each event of columns as a comparable tuple."""
    return [
        (
            int(columns.kinds[i]), columns.request_ids[columns.request_index[i]], int(columns.item_ids[i]),
            int(columns.user_ids[i]), int(columns.positions[i]), int(columns.event_time_ms[i]),
            int(columns.action_types[i]), float(columns.values[i]),
            columns.contexts[columns.context_index[i]] if columns.context_index[i] >= 0 else (),
        )
        for i in range(len(columns))
    ]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(entries)
def test_batches_and_columns_give_the_valid_events_in_order_and_a_reason_for_every_other_entry(entries):
    events, reasons = reference(entries)
    want = as_rows(columns_of_events([event for _, event in events]))
    data = events_pb2.EventBatch(events=entries).SerializeToString()
    got, bad = message_events("events.batch.3", data)
    assert as_rows(got) == want
    assert [(index, reason) for index, _, reason in bad] == reasons
    for index, raw, _ in bad:
        assert events_pb2.Event.FromString(raw) == entries[index]  # the dead letter holds the entry itself
    if all(entry.WhichOneof("kind") for entry in entries):
        columns = [getattr(entry, entry.WhichOneof("kind")) for entry in entries]
        got, bad = message_events("events.columns.3", encode_event_columns(columns))
        assert as_rows(got) == want
        assert [(index, reason) for index, _, reason in bad] == reasons


def test_contexts_are_sorted_by_name_and_values_kept():
    batch = events_pb2.EventBatch()
    imp = batch.events.add().impression
    imp.request_id, imp.item_id, imp.event_time_ms = "r", 4, 9
    imp.context.update({"os": "ios", "device": "phone"})
    act = batch.events.add().action
    act.request_id, act.item_id, act.type = "r", 4, events_pb2.ACTION_TYPE_DWELL
    act.value = 2.5
    batch.events.add()
    columns, bad = message_events("events.batch.0", batch.SerializeToString())
    rows = as_rows(columns)
    assert rows[0][-1] == (("device", "phone"), ("os", "ios"))
    assert rows[1][6:8] == (4, 2.5)
    assert [(index, reason) for index, _, reason in bad] == [
        (2, "batch entry is neither an impression nor an action")
    ]


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [
        (
            "events.impressions.0",
            events_pb2.Impression(user_id=1).SerializeToString(),
            "impression without request_id",
        ),
        ("events.actions.0", events_pb2.Action(request_id="r").SerializeToString(), "action type unspecified"),
        ("events.impressions.0", b"\xff\xff", "cannot decode Impression"),
        ("events.batch.0", b"\xff\xff", "cannot decode EventBatch"),
        ("events.columns.0", b"\xff\xff", "cannot decode EventColumns"),
        ("events.other.0", b"", "unknown event subject"),
    ],
)
def test_an_unusable_message_is_rejected_whole_with_its_reason(subject, data, reason):
    with pytest.raises(bus.Reject) as err:
        message_events(subject, data)
    assert reason in err.value.reason
