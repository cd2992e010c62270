"""The joiner's conversion of EventBatch entries: the inline path agrees with ``parse_event`` entry by entry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from freshet import bus
from freshet.events.v1 import events_pb2
from services.joiner.service import batch_events, parse_event

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


def reference(batch: events_pb2.EventBatch) -> tuple[list, list[tuple[int, str]]]:
    """Every entry through ``parse_event``, as the joiner converted single events."""
    events, bad = [], []
    for index, entry in enumerate(batch.events):
        which = entry.WhichOneof("kind")
        try:
            if which is None:
                raise bus.Reject("batch entry is neither an impression nor an action")
            events.append(parse_event(getattr(entry, which)))
        except bus.Reject as rej:
            bad.append((index, rej.reason))
    return events, bad


@settings(max_examples=300, deadline=None)
@given(entries)
def test_batch_events_gives_the_events_and_reasons_of_parse_event_for_every_entry(entries):
    batch = events_pb2.EventBatch(events=entries)
    batch = events_pb2.EventBatch.FromString(batch.SerializeToString())  # as the joiner gets it
    assert batch_events(batch) == reference(batch)


def test_batch_events_keeps_arrival_order_and_sorts_each_context_by_name():
    batch = events_pb2.EventBatch()
    imp = batch.events.add().impression
    imp.request_id, imp.item_id, imp.event_time_ms = "r", 4, 9
    imp.context.update({"os": "ios", "device": "phone"})
    act = batch.events.add().action
    act.request_id, act.item_id, act.type = "r", 4, events_pb2.ACTION_TYPE_DWELL
    act.value = 2.5
    batch.events.add()
    events, bad = batch_events(batch)
    assert [e.context for e in events[:1]] == [(("device", "phone"), ("os", "ios"))]
    assert events[1].value == 2.5 and events[1].type.name == "DWELL"
    assert bad == [(2, "batch entry is neither an impression nor an action")]
