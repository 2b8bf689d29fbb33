import pytest

from schemas import Event
from schemas.arrow import arrow_schema
from streams.archive import file_name, first_per_key, hour_folder, plan_files, read_archive, write_batch
from tests import factories
from tests.factories import bind

NOW = 1_764_000_000.0  # 2025-11-24T16:00:00Z


event = bind(factories.event, "i", "ts")


@pytest.mark.parametrize("ts, folder", [
    (NOW, "dt=2025-11-24/hour=16"),
    (NOW - 0.001, "dt=2025-11-24/hour=15"),
    (NOW + 8 * 3600 - 0.5, "dt=2025-11-24/hour=23"),
    (NOW + 8 * 3600, "dt=2025-11-25/hour=00"),
    (946_684_800.0, "dt=2000-01-01/hour=00"),
])
def test_hour_folder_is_the_utc_date_and_hour(ts, folder):
    assert hour_folder(ts) == folder


def test_a_partitions_rows_split_into_one_file_per_hour_named_by_offsets():
    rows = [(12, event(3, NOW + 5)), (10, event(1, NOW + 1)), (11, event(2, NOW - 1)), (13, event(4, NOW + 9))]
    plan = plan_files(2, rows)
    assert {k: [o for o, _ in v] for k, v in plan.items()} == {
        f"dt=2025-11-24/hour=16/{file_name(2, 10, 13)}": [10, 12, 13],
        "dt=2025-11-24/hour=15/part-2-11-11.parquet": [11],
    }


def test_written_batch_reads_back_without_temp_files(tmp_path):
    rows = {0: [(0, event(0, NOW)), (1, event(1, NOW - 3600))], 1: [(5, event(5, NOW, price=2.5))]}
    written = write_batch(tmp_path, rows)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p.relative_to(tmp_path).as_posix() for p in written) == [
        "dt=2025-11-24/hour=15/part-0-1-1.parquet", "dt=2025-11-24/hour=16/part-0-0-0.parquet",
        "dt=2025-11-24/hour=16/part-1-5-5.parquet"]
    table = read_archive(tmp_path)
    assert table.schema == arrow_schema(Event)
    assert sorted(table.column("event_id").to_pylist()) == ["e0", "e1", "e5"]


def test_read_archive_drops_repeated_event_ids_and_ignores_hidden_files(tmp_path):
    write_batch(tmp_path, {0: [(0, event(0, NOW)), (1, event(1, NOW))]})
    write_batch(tmp_path, {0: [(1, event(1, NOW)), (2, event(2, NOW))]})  # re-read after a crash
    (tmp_path / "dt=2025-11-24/hour=16/.part-0-3-9.parquet.x.tmp").write_bytes(b"half a file")
    assert read_archive(tmp_path).column("event_id").to_pylist() == ["e0", "e1", "e2"]


def test_reading_an_empty_archive_gives_an_empty_table(tmp_path):
    assert read_archive(tmp_path / "nothing").num_rows == 0


def test_first_per_key_keeps_the_first_row_in_order():
    import pyarrow as pa
    table = pa.table({"k": ["b", "a", "b", "c", "a"], "v": [1, 2, 3, 4, 5]})
    assert first_per_key(table, "k").to_pydict() == {"k": ["b", "a", "c"], "v": [1, 2, 4]}
