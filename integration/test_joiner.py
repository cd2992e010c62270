"""The joiner on a real nats-server: samples out, malformed input dead-lettered, never stalled."""

from __future__ import annotations

import numpy as np
import pytest

from freshet import bus
from freshet.batches import SampleArrays
from freshet.config import BusConfig
from freshet.events.v1 import events_pb2
from freshet.testing import SampleReader, assert_eventually
from services.joiner.config import JoinerConfig
from services.joiner.service import JoinerService


async def samples_in_stream(js) -> SampleReader:
    """Every sample in the SAMPLES stream (messages may hold several)."""
    reader = SampleReader(js)
    await reader.read()
    return reader


async def test_malformed_events_are_dead_lettered_and_the_join_goes_on(nats_url):
    async with JoinerService(
        JoinerConfig(window_s=0.3, allowed_lateness_s=0, idle_timeout_s=0.2), BusConfig(nats_url=nats_url)
    ) as joiner:
        js = joiner.js
        await bus.publish(js, "events.impressions.0", b"\xff\xff\xff garbage")
        await bus.publish(
            js, "events.impressions.0", events_pb2.Impression(user_id=1, item_id=2).SerializeToString()
        )
        await bus.publish(js, "events.unknown.0", b"")
        good = events_pb2.Impression(request_id="r1", user_id=1, item_id=2, position=1)
        await bus.publish(js, "events.impressions.0", good.SerializeToString())
        click = events_pb2.Action(request_id="r1", item_id=2, type=events_pb2.ACTION_TYPE_CLICK)
        await bus.publish(js, "events.actions.0", click.SerializeToString())
        other = events_pb2.Impression(request_id="r2", user_id=1, item_id=3)
        await bus.publish(js, "events.impressions.0", other.SerializeToString())

        async def dead_letters():
            info = await js.stream_info(bus.DEADLETTER.name)
            return info.state.messages == 3 and info

        await assert_eventually(dead_letters, timeout_s=10)
        first = await js.get_msg(bus.DEADLETTER.name, 1)
        assert first.data == b"\xff\xff\xff garbage"
        assert "cannot decode Impression" in first.headers["Freshet-Reason"]
        second = await js.get_msg(bus.DEADLETTER.name, 2)
        assert second.headers["Freshet-Reason"] == "impression without request_id"

        async def both_samples():
            samples = await samples_in_stream(js)
            return len(samples.ids) == 2 and samples

        samples = await assert_eventually(both_samples, timeout_s=10)
        assert samples.labels == {"r1:2:v1": 1.0, "r2:3:v1": 0.0}
        assert joiner.counts["positives"] == 1 and joiner.counts["negatives"] == 1


async def test_restarted_joiner_does_not_emit_a_sample_twice(nats_url):
    config, bus_config = (
        JoinerConfig(window_s=0.2, allowed_lateness_s=0, idle_timeout_s=0.2),
        BusConfig(nats_url=nats_url),
    )
    async with JoinerService(config, bus_config) as joiner:
        for i in range(5):
            imp = events_pb2.Impression(request_id=f"r{i}", user_id=1, item_id=i)
            await bus.publish(joiner.js, "events.impressions.0", imp.SerializeToString(), msg_id=f"i{i}")
        await assert_eventually(lambda: joiner.counts["negatives"] == 5, timeout_s=10)
    # Replaying the same events (a client retry) after a restart is deduplicated end to end.
    async with JoinerService(config, bus_config) as joiner:
        for i in range(5):
            imp = events_pb2.Impression(request_id=f"r{i}", user_id=1, item_id=i)
            await bus.publish(joiner.js, "events.impressions.0", imp.SerializeToString(), msg_id=f"i{i}")
        extra = events_pb2.Impression(request_id="r9", user_id=1, item_id=9)
        await bus.publish(joiner.js, "events.impressions.0", extra.SerializeToString(), msg_id="i9")
        await assert_eventually(lambda: joiner.counts["negatives"] == 1, timeout_s=10)
        # Joined is not yet published: the deliverer publishes after the step's commit.
        await assert_eventually(lambda: joiner.counts["samples"] == 1, timeout_s=10)
        samples = await samples_in_stream(joiner.js)
        assert sorted(samples.ids) == [f"r{i}:{i}:v1" for i in (0, 1, 2, 3, 4, 9)]


async def test_sample_continues_the_trace_of_the_click_that_labelled_it(nats_url):
    from opentelemetry import trace

    from freshet import telemetry

    telemetry.setup_tracing("test")
    tracer = telemetry.tracer(__name__)
    async with JoinerService(JoinerConfig(window_s=5), BusConfig(nats_url=nats_url)) as joiner:
        imp = events_pb2.Impression(request_id="t1", user_id=1, item_id=2)
        await bus.publish(joiner.js, "events.impressions.0", imp.SerializeToString())
        with tracer.start_as_current_span("client_click") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            click = events_pb2.Action(request_id="t1", item_id=2, type=events_pb2.ACTION_TYPE_CLICK)
            await bus.publish(joiner.js, "events.actions.0", click.SerializeToString())
        assert trace.get_current_span().get_span_context().is_valid is False

        async def sample_msg():
            info = await joiner.js.stream_info(bus.SAMPLES.name)
            return info.state.messages == 1 and await joiner.js.get_msg(bus.SAMPLES.name, 1)

        msg = await assert_eventually(sample_msg, timeout_s=10)
        assert msg.headers["traceparent"].split("-")[1] == trace_id


async def test_two_instances_each_owning_a_partition_join_their_own_events(nats_url):
    bus_config = BusConfig(nats_url=nats_url)

    def config(owned: str) -> JoinerConfig:
        return JoinerConfig(
            window_s=0.2, allowed_lateness_s=0, idle_timeout_s=0.2, partitions=2, owned_partitions=(owned,)
        )

    async with JoinerService(config("0"), bus_config) as first, JoinerService(config("1"), bus_config) as second:
        js = first.js
        requests = [f"q{i}" for i in range(40)]
        for request in requests:
            p = bus.event_partition(request, 2)
            imp = events_pb2.Impression(request_id=request, user_id=1, item_id=7, event_time_ms=bus.now_ms())
            await bus.publish(js, f"events.impressions.{p}", imp.SerializeToString())
            act = events_pb2.Action(request_id=request, item_id=7, type=events_pb2.ACTION_TYPE_CLICK)
            act.event_time_ms = imp.event_time_ms + 1
            await bus.publish(js, f"events.actions.{p}", act.SerializeToString())

        async def all_joined():
            return len((await samples_in_stream(js)).ids) == 40

        await assert_eventually(all_joined, timeout_s=10)
        owned = {0: first, 1: second}
        for p, joiner in owned.items():
            mine = [r for r in requests if bus.event_partition(r, 2) == p]
            assert joiner.counts["positives"] == len(mine)
        info = await js.stream_info(bus.SAMPLES.name, subjects_filter="samples.>")
        assert set(info.state.subjects) == {"samples.0", "samples.1"}


def test_a_partition_outside_the_configured_count_is_a_configuration_error():
    with pytest.raises(ValueError, match="FRESHET_JOINER_PARTITIONS"):
        JoinerService(JoinerConfig(partitions=2, owned_partitions=("2",)), BusConfig())


async def test_a_like_after_a_click_is_emitted_as_version_two_with_the_full_label_vector(nats_url):
    config = JoinerConfig(window_s=5, allowed_lateness_s=0, idle_timeout_s=5)
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        js, t = joiner.js, bus.now_ms()
        imp = events_pb2.Impression(request_id="m1", user_id=1, item_id=3, event_time_ms=t)
        await bus.publish(js, "events.impressions.0", imp.SerializeToString())
        for kind, dt in ((events_pb2.ACTION_TYPE_CLICK, 1), (events_pb2.ACTION_TYPE_LIKE, 2)):
            act = events_pb2.Action(request_id="m1", item_id=3, type=kind, value=1, event_time_ms=t + dt)
            await bus.publish(js, "events.actions.0", act.SerializeToString())

        async def two_samples():
            samples = await samples_in_stream(js)
            return len(samples.ids) == 2 and SampleArrays.concat(samples.batches)

        both = await assert_eventually(two_samples, timeout_s=10)
        assert (both.sample_ids, both.versions.tolist()) == (["m1:3:v1", "m1:3:v2"], [1, 2])
        assert both.label_vectors.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]


async def test_batched_events_are_joined_and_bad_entries_dead_lettered_by_index(nats_url):
    config = JoinerConfig(window_s=5, allowed_lateness_s=0, idle_timeout_s=5)
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        js, t = joiner.js, bus.now_ms()
        batch = events_pb2.EventBatch()
        batch.events.add().impression.CopyFrom(
            events_pb2.Impression(request_id="b1", user_id=4, item_id=5, event_time_ms=t)
        )
        batch.events.add().action.CopyFrom(events_pb2.Action(request_id="b1", item_id=5, event_time_ms=t + 1))
        batch.events.add()  # neither kind
        batch.events.add().action.CopyFrom(
            events_pb2.Action(request_id="b1", item_id=5, type=events_pb2.ACTION_TYPE_CLICK, event_time_ms=t + 2)
        )
        await bus.publish(js, "events.batch.0", batch.SerializeToString())
        await bus.publish(js, "events.batch.0", b"\x0a\xff")

        async def dead_letters():
            info = await js.stream_info(bus.DEADLETTER.name)
            return info.state.messages == 3 and info

        await assert_eventually(dead_letters, timeout_s=10)
        by_part = {}
        for seq in (1, 2, 3):
            msg = await js.get_msg(bus.DEADLETTER.name, seq)
            by_part[msg.headers.get("Freshet-Part")] = (msg.headers["Freshet-Reason"], msg.data)
        assert by_part["1"][0] == "action type unspecified"
        assert events_pb2.Event.FromString(by_part["1"][1]).action.request_id == "b1"
        assert by_part["2"][0] == "batch entry is neither an impression nor an action"
        assert "cannot decode EventBatch" in by_part[None][0]
        samples = await assert_eventually(lambda: _one_sample(js), timeout_s=10)
        assert samples.labels == {"b1:5:v1": 1.0}
        assert joiner.counts["invalid_events"] == 3


async def _one_sample(js):
    samples = await samples_in_stream(js)
    return len(samples.ids) == 1 and samples


async def test_outputs_committed_before_a_crash_are_published_on_start_unless_already_delivered(
    nats_url, tmp_path
):
    from freshet.batches import Sample, encode_samples
    from services.joiner.columnjoin import ColumnJoin

    config = JoinerConfig(state_dir=str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    join = ColumnJoin(config.join_config(), str(tmp_path / "state" / "p0"))
    outputs = [encode_samples([Sample(f"x{i}:1:v1", np.arange(3, dtype=np.int64), 1.0)]) for i in range(2)]
    seqs = [join.stage_output(data) for data in outputs]
    join.commit()  # ... and the process dies before publishing the second output
    join.close()
    async with JoinerService(JoinerConfig(), BusConfig(nats_url=nats_url)) as other:  # declares streams
        await bus.publish(other.js, "samples.0", outputs[0], msg_id=f"sb:0:{join.epoch}:{seqs[0]}")
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        assert joiner.outputs_republished == 1
        samples = await samples_in_stream(joiner.js)
        assert samples.ids == ["x0:1:v1", "x1:1:v1"]
        assert joiner.partitions[0].join.pending_outputs() == []
