"""Clickstream tally: validate each record, count events per user in a changelogged table,
send refused records to the dead-letter topic."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import faust

from recstream.settings import Settings
from schemas import Event, SchemaError
from streams import deadletter
from streams.app import raw_topic


@dataclass
class TallyStats:
    """Process-local counts, for progress and lag reports."""
    processed: Counter = field(default_factory=Counter)
    dead_letters: int = 0

    @property
    def seen(self) -> int:
        return sum(self.processed.values()) + self.dead_letters


@dataclass
class Tally:
    agent: faust.types.AgentT
    table: faust.types.TableT
    stats: TallyStats


def register(app: faust.App, s: Settings) -> Tally:
    clickstream = raw_topic(app, s.topic("clickstream"))
    dead_letters = raw_topic(app, s.topic("deadletter"))
    # Keyed by user_id like the clickstream, so a user's row lives on the partition of their events.
    counts = app.Table("user-event-counts", default=dict, key_type=str,
                       partitions=s.clickstream_partitions)
    stats = TallyStats()

    @app.agent(clickstream, name="tally_events")
    async def tally_events(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                record = Event.from_json(event.value)
            except SchemaError as exc:
                await deadletter.send(dead_letters, deadletter.from_error(event, exc))
                stats.dead_letters += 1
                continue
            row = dict(counts[record.user_id])
            row[record.event_type] = row.get(record.event_type, 0) + 1
            counts[record.user_id] = row
            stats.processed[record.event_type] += 1

    return Tally(tally_events, counts, stats)
