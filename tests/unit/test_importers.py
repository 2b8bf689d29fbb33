from pathlib import Path

import pytest

from recstream.data import DataError, import_events
from recstream.data.importers import movielens_event_type, sessionize

NOW = 1_764_000_000.0


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_generic_csv_with_a_malformed_row_reports_its_line(tmp_path):
    path = write(tmp_path, "events.csv",
                 "user_id,product_id,event_type,timestamp,price\n"
                 "u1,p1,view,1700000000,\n"
                 "u1,p2,wishlist,1700000010,\n"     # line 3: bad type
                 "u2,p1,purchase,1700000020,-5\n"   # line 4: negative price
                 "u1,p3,add_to_cart,1700000030,12.5\n")
    data = import_events("csv", path, now=NOW)
    assert [e.product_id for e in data.events] == ["p1", "p3"]
    assert [(e.line, e.field) for e in data.errors] == [(3, "event_type"), (4, "price")]
    assert "events.csv:3: event_type" in str(data.errors[0])
    with pytest.raises(DataError, match="events.csv:3: event_type"):
        import_events("csv", path, on_error="stop", now=NOW)


def test_generic_csv_derives_sessions_and_stable_ids(tmp_path):
    path = write(tmp_path, "e.csv", "user_id,product_id,event_type,timestamp\n"
                 "u1,p1,view,1700000000\nu1,p2,view,1700000100\nu1,p3,view,1700005000\n")
    first, again = import_events("csv", path, now=NOW), import_events("csv", path, now=NOW)
    assert [e.session_id for e in first.events] == ["u1-0", "u1-0", "u1-1"]
    assert [e.event_id for e in first.events] == [e.event_id for e in again.events]
    assert len({e.event_id for e in first.events}) == 3


def test_sessionize_orders_by_time_within_user():
    rows = [(2, {"user_id": "a", "timestamp": 100.0}), (3, {"user_id": "a", "timestamp": 50.0}),
            (4, {"user_id": "a", "timestamp": 4000.0}), (5, {"user_id": "b", "timestamp": 60.0})]
    by_line = {line: d["session_id"] for line, d in sessionize(rows, gap_s=1800)}
    assert by_line == {3: "a-0", 2: "a-0", 4: "a-1", 5: "b-0"}


@pytest.mark.parametrize("rating, kind", [(5.0, "purchase"), (4.0, "purchase"), (3.5, "click"), (1.0, "view")])
def test_movielens_ratings_as_implicit_feedback(rating, kind):
    assert movielens_event_type(rating) == kind


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        import_events("parquet", tmp_path)
    with pytest.raises(FileNotFoundError):
        import_events("csv", tmp_path / "nope.csv")


def test_groceries_bad_date_is_named(tmp_path):
    path = write(tmp_path, "g.csv", "Member_number,Date,itemDescription\n1,21-07-2015,whole milk\n2,2015/07/21,tea\n")
    data = import_events("groceries", path, now=NOW)
    assert data.events[0].product_id == "whole-milk" and data.events[0].event_type == "purchase"
    assert [(e.line, e.field) for e in data.errors] == [(3, "timestamp")]


# -- the real public datasets, read in place ---------------------------------------------------

def test_taobao_head(shared_data):
    data = import_events("taobao", shared_data / "taobao-userbehavior-head" / "UserBehavior_head.csv")
    kinds = {k: sum(e.event_type == k for e in data.events) for k in ("view", "click", "add_to_cart", "purchase")}
    assert not data.errors and len(data.events) == 84_287   # counts from SOURCE.md
    assert kinds == {"view": 75_693, "click": 2_351, "add_to_cart": 4_494, "purchase": 1_749}
    assert len({e.user_id for e in data.events}) == 814
    assert all(a.timestamp <= b.timestamp for a, b in zip(data.events, data.events[1:]))


def test_yoochoose_test_split(shared_data):
    data = import_events("yoochoose", shared_data / "yoochoose-clicks-100k" / "yoochoose-clicks-100k_test.txt")
    assert not data.errors and len(data.events) == 13_568 and len({e.session_id for e in data.events}) == 3_416


def test_groceries(shared_data):
    data = import_events("groceries", shared_data / "groceries-kaggle" / "Groceries_dataset.csv")
    assert not data.errors and len(data.events) == 38_765
    assert len({e.session_id for e in data.events}) == 14_963 and len({e.product_id for e in data.events}) == 167


def test_movielens_with_catalogue(shared_data):
    data = import_events("movielens", shared_data / "movielens-latest-small")
    assert not data.errors and len(data.events) == 100_836 and len(data.products) == 9_742
    toy_story = next(p for p in data.products if p.product_id == "1")
    assert toy_story.category_path[0] == "Adventure"
