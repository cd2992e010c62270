"""EventPublisher on a real JetStream: columns on ``events.columns.<p>`` by default, ``EventBatch`` on
``events.batch.<p>`` when asked, each partition's events in order under sequential message ids."""

from __future__ import annotations

import pytest

from freshet import bus
from freshet.eventcolumns import decode_event_columns, row_event
from freshet.eventlog import EventPublisher, batch_subject, columns_subject, decode_event_batch
from freshet.events.v1 import events_pb2


def events(n: int = 60) -> list[events_pb2.Impression | events_pb2.Action]:
    out: list = []
    for i in range(n):
        request = f"req-{i // 3}"
        if i % 3 == 2:
            out.append(
                events_pb2.Action(request_id=request, item_id=i, type=events_pb2.ACTION_TYPE_CLICK, value=1.0)
            )
        else:
            imp = events_pb2.Impression(request_id=request, user_id=i, item_id=i, position=i % 3, event_time_ms=i)
            if i % 2:
                imp.context["device"] = "ios"
            out.append(imp)
    return out


async def stored(js) -> list[tuple[str, str, bytes]]:
    info = await js.stream_info(bus.EVENTS.name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(bus.EVENTS.name, seq)
        out.append((msg.subject, msg.headers[bus.MSG_ID], msg.data))
    return out


def as_events(subject: str, data: bytes) -> list:
    if subject.startswith("events.batch."):
        return decode_event_batch(data)
    columns = decode_event_columns(data)
    rows = [events_pb2.Event.FromString(row_event(columns, i)) for i in range(len(columns))]
    return [getattr(row, row.WhichOneof("kind")) for row in rows]


@pytest.mark.parametrize(("columnar", "subject_of"), [(True, columns_subject), (False, batch_subject)])
async def test_publisher_sends_each_partitions_events_in_order_in_its_form(js, columnar, subject_of):
    sent = events()
    assert {bus.event_partition(e.request_id, 2) for e in sent} == {0, 1}
    publisher = EventPublisher(js, 2, "client", max_events=16, columnar=columnar)
    for event in sent:
        await publisher.add(event)
    await publisher.flush()

    messages = await stored(js)
    assert {subject for subject, _, _ in messages} == {subject_of(0), subject_of(1)}
    for partition in range(2):
        mine = [(msg_id, data) for subject, msg_id, data in messages if subject == subject_of(partition)]
        assert [msg_id for msg_id, _ in mine] == [f"client:{partition}:{n}" for n in range(1, len(mine) + 1)]
        got = [e for _, data in mine for e in as_events(subject_of(partition), data)]
        assert got == [e for e in sent if bus.event_partition(e.request_id, 2) == partition]
        assert all(len(as_events(subject_of(partition), data)) <= 16 for _, data in mine)
    assert (publisher.events_published, publisher.messages_published) == (len(sent), len(messages))
