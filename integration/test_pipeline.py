"""End to end: events in, a changed score out, through all six services on a real nats-server."""

from __future__ import annotations

from freshet.testing import assert_eventually


async def test_clicks_on_a_pair_raise_its_served_score_and_advance_the_version(pipeline):
    user, item = 7, 42
    # Phase 1: impressions without clicks on other items give the model a first version.
    for i in range(20):
        await pipeline.impression(f"warm-{i}", user, 100 + i % 5)

    async def served_version():
        return (await pipeline.score(user, item))[1] > 0 and pipeline.trainer.learner.samples_trained >= 20

    await assert_eventually(served_version, timeout_s=20, message="first model version served")
    await assert_eventually(lambda: pipeline.publisher.cursor == pipeline.store.tables["fm"].version, timeout_s=10)
    before, v_before = await pipeline.score(user, item)

    # Phase 2: the user clicks the item every time it is shown.
    for i in range(30):
        await pipeline.impression(f"hot-{i}", user, item)
        await pipeline.click(f"hot-{i}", item)

    async def score_rose():
        score, version = await pipeline.score(user, item)
        return score > before + 0.1 and version > v_before and (score, version)

    after, v_after = await assert_eventually(score_rose, timeout_s=20, message=f"score above {before:.3f}")
    await assert_eventually(lambda: pipeline.joiner.counts["positives"] == 30, timeout_s=10)
    assert pipeline.validator.rejected == 0
    assert pipeline.predictor.gaps == 0
