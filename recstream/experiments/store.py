"""The experiments file on disk: followed by readers, changed by one locked, validated, atomic write path.

Readers (`refresh`) re-read the file when its (mtime, size, inode) changed; a file that became
invalid (say a bad hand edit) is logged and the last good set kept, so serving never loses its
experiments to a typo. Writers (`update` and the helpers on top of it) take an exclusive flock on
`<file>.lock`, re-read the file under it (so concurrent writers, in this process or another, never
lose each other's changes), validate the whole new set through `loads(dumps(new))`, bump
`revision`, keep the previous file as `<file>.history/r<old revision>.toml` (the newest
HISTORY_KEEP) and replace the file atomically (tmp file, fsync, os.replace). Any ExperimentError
and nothing is written.

A running experiment (start <= now < end) is protected: changing its variants, weights, traffic,
layer, control or start, deleting it, or any change that moves its slice of the layer reshuffles
who sees what and invalidates its analysis, so `put` and `delete` refuse that without force=True.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from recstream.experiments.definition import SUPPORTED_VERSIONS, Changes, Experiment, ExperimentError, ExperimentSet, dumps, loads

log = logging.getLogger(__name__)

HISTORY_KEEP = 20
# What a running experiment may not change (attribute -> name in the file).
_FROZEN_WHILE_RUNNING = {"layer": "layer", "start_s": "start", "traffic": "traffic", "variants": "variants",
                         "control": "control"}

Stamp = tuple[int, int, int]


def empty() -> ExperimentSet:
    return ExperimentSet(SUPPORTED_VERSIONS[-1], ())


class ExperimentStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.error: str | None = None   # the last reload problem, None once the file reads well
        self._current = empty()
        self._stamp: Stamp | None = None
        self.refresh()

    @property
    def current(self) -> ExperimentSet:
        return self._current

    @property
    def history_dir(self) -> Path:
        return self.path.parent / (self.path.name + ".history")

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when the current set was replaced."""
        try:
            with open(self.path, "rb") as f:
                stamp = _stamp(os.fstat(f.fileno()))
                if stamp == self._stamp:
                    return False
                raw = f.read()
        except FileNotFoundError:
            if self._stamp is None:
                return False
            self._stamp, self._current, self.error = None, empty(), None
            log.info("experiments file %s is gone: no experiments", self.path)
            return True
        self._stamp = stamp
        try:
            es = loads(raw.decode("utf-8"))
        except (ExperimentError, UnicodeDecodeError) as exc:
            self.error = f"{self.path}: {exc}"
            log.error("experiments file %s is invalid; keeping revision %d: %s", self.path,
                      self._current.revision, exc)
            return False
        self._current, self.error = es, None
        return True

    def update(self, fn: Callable[[ExperimentSet], ExperimentSet]) -> ExperimentSet:
        """Apply fn to the file's set under the lock, validate, write revision + 1 atomically; return it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / (self.path.name + ".lock"), "ab") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)     # released when the file is closed
            try:
                old_raw: bytes | None = self.path.read_bytes()
            except FileNotFoundError:
                old_raw = None
            try:
                old = empty() if old_raw is None else loads(old_raw.decode("utf-8"))
            except (ExperimentError, UnicodeDecodeError) as exc:
                raise ExperimentError([f"{self.path}: the file is invalid, fix it before changing it here: {exc}"]) \
                    from None
            new = fn(old)
            text = dumps(dataclasses.replace(new, revision=old.revision + 1))
            checked = loads(text)        # everything `loads` checks, as readers will read it
            if old_raw is not None:
                self._keep_history(old.revision, old_raw)
            tmp = self.path.parent / (self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                stamp = _stamp(os.fstat(f.fileno()))
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        self._current, self._stamp, self.error = checked, stamp, None
        log.info("experiments file %s: revision %d written", self.path, checked.revision)
        return checked

    def put(self, e: Experiment, force: bool = False, now_s: float | None = None) -> bool:
        """Create or replace experiment e.id; True when created. A running one may only change its
        description and end unless force."""
        now = time.time() if now_s is None else now_s
        created = False

        def change(old: ExperimentSet) -> ExperimentSet:
            nonlocal created
            ids = [x.id for x in old.experiments]
            created = e.id not in ids
            if not created:
                before = old.experiments[ids.index(e.id)]
                changed = [name for attr, name in _FROZEN_WHILE_RUNNING.items()
                           if getattr(before, attr) != getattr(e, attr)]
                if before.active(now) and changed and not force:
                    raise ExperimentError(f"experiment {e.id!r} is running: changing its {', '.join(changed)} would "
                                          "reshuffle who sees what and invalidate its analysis; only description "
                                          "and end may change (end it and start a new one, or force)")
            experiments = old.experiments + (e,) if created else \
                tuple(e if x.id == e.id else x for x in old.experiments)
            return _keeping_slices(old, dataclasses.replace(old, experiments=experiments), now, force)

        self.update(change)
        return created

    def delete(self, experiment_id: str, force: bool = False, now_s: float | None = None) -> None:
        """Remove an experiment; a running one only with force."""
        now = time.time() if now_s is None else now_s

        def change(old: ExperimentSet) -> ExperimentSet:
            if old.get(experiment_id).active(now) and not force:
                raise ExperimentError(f"experiment {experiment_id!r} is running: deleting it would lose its "
                                      "analysis; end it first (or force)")
            kept = tuple(x for x in old.experiments if x.id != experiment_id)
            return _keeping_slices(old, dataclasses.replace(old, experiments=kept), now, force)

        self.update(change)

    def end(self, experiment_id: str, now_s: float) -> ExperimentSet:
        """End an experiment now (its end becomes now_s)."""
        def change(old: ExperimentSet) -> ExperimentSet:
            e = old.get(experiment_id)
            if e.end_s <= now_s:
                raise ExperimentError(f"experiment {experiment_id!r} has already ended")
            if e.start_s >= now_s:
                raise ExperimentError(f"experiment {experiment_id!r} has not started: delete it instead")
            ended = dataclasses.replace(e, end_s=now_s)
            return dataclasses.replace(old, experiments=tuple(ended if x.id == e.id else x for x in old.experiments))

        return self.update(change)

    def set_defaults(self, changes: Changes) -> ExperimentSet:
        """Replace the production configuration under every variant."""
        return self.update(lambda old: dataclasses.replace(old, defaults=changes))

    def _keep_history(self, revision: int, raw: bytes) -> None:
        self.history_dir.mkdir(exist_ok=True)
        (self.history_dir / f"r{revision}.toml").write_bytes(raw)
        kept = sorted((p for p in self.history_dir.glob("r*.toml") if p.stem[1:].isdigit()),
                      key=lambda p: int(p.stem[1:]))
        for p in kept[:-HISTORY_KEEP]:
            p.unlink(missing_ok=True)


def _keeping_slices(old: ExperimentSet, new: ExperimentSet, now_s: float, force: bool) -> ExperimentSet:
    """new, unless it moves the slice of an experiment running now in both (then an error, bar force)."""
    moved = [] if force else [e.id for e in old.active(now_s) if e.id in new.slices
                              and new.get(e.id).active(now_s) and new.slices[e.id] != old.slices[e.id]]
    if moved:
        raise ExperimentError([f"experiment {eid!r} is running: this change would move its slice of layer "
                               f"{old.get(eid).layer!r} from {old.slices[eid]} to {new.slices[eid]}, reshuffling "
                               "who sees what (change start times, or force)" for eid in moved])
    return new


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_mtime_ns, st.st_size, st.st_ino


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
