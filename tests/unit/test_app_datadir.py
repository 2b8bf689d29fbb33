"""Each feature-worker process claims a table directory of its own (streams/app.py claim_datadir)."""
import os
import subprocess
import sys

from streams.app import claim_datadir


def test_a_second_claim_gets_the_next_slot_and_a_released_slot_is_reused(tmp_path):
    root = tmp_path / "faust" / "app"
    first, fd1 = claim_datadir(root)
    second, fd2 = claim_datadir(root)
    try:
        assert first == root and second == root.with_name("app.1")
        os.close(fd1)   # the first worker stops: its slot (and its RocksDB files) go to the next one
        fd1 = None
        again, fd3 = claim_datadir(root)
        assert again == root
        os.close(fd3)
    finally:
        for fd in (fd1, fd2):
            if fd is not None:
                os.close(fd)


def test_a_claim_held_by_another_process_is_skipped(tmp_path):
    root = tmp_path / "app"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from streams.app import claim_datadir; "
        f"print(claim_datadir(__import__('pathlib').Path({str(root)!r}))[0], flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == str(root)
        path, fd = claim_datadir(root)
        os.close(fd)
        assert path == root.with_name("app.1")
    finally:
        holder.kill()
        holder.wait()


def test_the_app_takes_its_standby_replicas_and_datadir_from_the_settings(tmp_path):
    import dataclasses

    from recstream.settings import load
    from streams.app import create_app

    s = dataclasses.replace(load({}), home_dir=tmp_path, app_id="unit-app", table_standby_replicas=2)
    app = create_app(s)
    try:
        assert app.conf.table_standby_replicas == 2
        assert str(app.conf.datadir) == str((tmp_path / "faust" / "unit-app").resolve())
    finally:
        os.close(app.datadir_lock)
