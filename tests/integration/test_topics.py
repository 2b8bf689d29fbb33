import dataclasses

import pytest

from streams.topics import ensure_topics, specs


async def test_topics_are_created_once_with_the_configured_partitions(fresh):
    s = fresh(clickstream_partitions=6)
    first = await ensure_topics(s)
    assert first[s.topic("clickstream")] == "created (6 partitions)"
    assert set(first) == {t.name for t in specs(s)}
    again = await ensure_topics(s)
    assert all(state.startswith("exists") for state in again.values())


async def test_a_topic_with_fewer_partitions_than_asked_is_refused(fresh):
    s = fresh(clickstream_partitions=2)
    await ensure_topics(s)
    with pytest.raises(RuntimeError, match="has 2 partitions, settings ask for 4"):
        await ensure_topics(dataclasses.replace(s, clickstream_partitions=4))
