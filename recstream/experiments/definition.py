"""A/B experiment definitions: a versioned TOML file parsed into frozen, validated dataclasses.

File format (`version = 1`); times are TOML datetimes with a UTC offset, or Unix seconds:

    version = 1
    revision = 7                          # optional, default 0; bumped by every write of the store

    [defaults]                            # optional: the production configuration, same keys as `changes`
    ranker = "champion"

    [[experiments]]
    id = "ranker-challenger"              # unique; letters, digits, '_', '-', '.'
    description = "Challenger ranker vs champion"
    layer = "ranking"                     # one unit is in at most one experiment per layer
    start = 2025-01-01T00:00:00Z          # inclusive
    end = 2025-02-01T00:00:00Z            # exclusive
    traffic = 0.5                         # share of the layer's units, in (0, 1]
    control = "control"                   # optional, default: the first variant
    kinds = ["homepage"]                  # optional: the widgets it covers (default: every kind)

    [[experiments.variants]]
    name = "control"
    weight = 0.5                          # weights sum to 1

    [[experiments.variants]]
    name = "challenger"
    weight = 0.5
    changes = { ranker = "challenger", candidates = 300 }

`changes` keys (all optional; absent means "as production"): sources (retrieval sources, a subset
of recstream.ranking.SOURCES), ranker (an MLflow model version number or alias), candidates
(1..2000), max_per_category (0..1000, 0 = no cap), exclude_purchased (bool).

Experiments of different layers are independent, so a unit can be in several at once: two that run
at the same time must not both change the same knob (say both set `ranker`), or their changes would
collide for the units in both; that is an error too.

Layers partition traffic: the experiments of one layer get disjoint slices of the layer's hash
space, so experiments may overlap in time as long as, at every instant, the traffic of those
running together fits in 1. Slices are laid out once per file, first-fit in order of (start, id):
each experiment takes the lowest free slice not used by an earlier-placed experiment it overlaps
in time. A slice therefore never moves while its experiment runs (others starting or ending do
not shift it); a layout that cannot fit is an error.

`loads` either returns a fully valid ExperimentSet or raises one ExperimentError listing every
problem with its location (e.g. `experiments[1].variants[0].weight: ...`): nothing half-applied.
`dumps` writes a set back as TOML that `loads` reads equal; `experiment_from_json` / `experiment_to_json`
and `changes_from_json` / `changes_to_json` are the JSON forms of the admin API (times: ISO-8601 with
an offset, or Unix seconds), validated the same way.
"""
from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.recommendations import KINDS, SOURCES

SUPPORTED_VERSIONS = (1,)
MAX_CANDIDATES = 2000
WEIGHT_TOLERANCE = 1e-9
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")   # fullmatch: ids go into Redis keys and file names
# MLflow versions are positive integers; aliases are letters, digits, '_' and '-'.
_RANKER = re.compile(r"^(?:[1-9][0-9]*|[A-Za-z][A-Za-z0-9_-]*)$")
_TOP_KEYS = {"version", "revision", "defaults", "experiments"}
_EXPERIMENT_KEYS = {"id", "description", "layer", "start", "end", "traffic", "control", "kinds", "variants"}
_VARIANT_KEYS = {"name", "weight", "changes"}
_CHANGES_KEYS = ("sources", "ranker", "candidates", "max_per_category", "exclude_purchased")
# start/end the admin API takes, Unix seconds: 2000-01-01 .. 2100-01-01 UTC. A time outside is a typo or
# a unit slip (milliseconds), and -1e300 has no date. The file itself takes any finite time (hand edits).
API_TIMES = (946_684_800.0, 4_102_444_800.0)
_ANY_TIME = (-math.inf, math.inf)


class ExperimentError(ValueError):
    """Invalid experiment definitions or lookups; `problems` holds one 'location: message' per issue."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) == 1
                         else f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems))


class UnknownExperiment(ExperimentError):
    """A lookup of an experiment id that is not in the set."""


@dataclass(frozen=True)
class Changes:
    """What a variant changes relative to production; None means unchanged."""
    sources: tuple[str, ...] | None = None
    ranker: str | None = None
    candidates: int | None = None
    max_per_category: int | None = None
    exclude_purchased: bool | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    changes: Changes = field(default_factory=Changes)


@dataclass(frozen=True)
class Experiment:
    id: str
    description: str
    layer: str
    start_s: float
    end_s: float
    traffic: float
    variants: tuple[Variant, ...]
    control: str = ""
    kinds: tuple[str, ...] = KINDS      # the recommendation kinds (widgets) it covers

    def active(self, now_s: float) -> bool:
        return self.start_s <= now_s < self.end_s

    def covers(self, kind: str | None) -> bool:
        return kind is None or kind in self.kinds

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ExperimentError(f"experiment {self.id!r}: unknown variant {name!r}")

    def knobs(self) -> set[str]:
        """The Changes fields any of its variants sets."""
        return {k for v in self.variants for k in _CHANGES_KEYS if getattr(v.changes, k) is not None}


@dataclass(frozen=True)
class ExperimentSet:
    version: int
    experiments: tuple[Experiment, ...]
    revision: int = 0                  # bumped by every write through recstream.experiments.store
    defaults: Changes = field(default_factory=Changes)   # production configuration, under every variant
    # id -> [lo, hi) slice of its layer's hash space; computed from the experiments, see module doc.
    slices: Mapping[str, tuple[float, float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems, slices = cross_check(list(enumerate(self.experiments)))
        if problems:
            raise ExperimentError(problems)
        object.__setattr__(self, "slices", slices)

    def active(self, now_s: float) -> tuple[Experiment, ...]:
        return tuple(e for e in self.experiments if e.active(now_s))

    def get(self, experiment_id: str) -> Experiment:
        for e in self.experiments:
            if e.id == experiment_id:
                return e
        raise UnknownExperiment(f"unknown experiment {experiment_id!r}")


def load(path: str | Path) -> ExperimentSet:
    return loads(Path(path).read_text(encoding="utf-8"))


def loads(text: str) -> ExperimentSet:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"<file>: not valid TOML: {e}") from None
    problems: list[str] = []
    _unknown_keys(doc, _TOP_KEYS, "", problems)
    version: Any = doc.get("version")   # a TOML value of any type until checked here
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        problems.append(f"version: must be one of {SUPPORTED_VERSIONS}, got {version!r}")
    revision = doc.get("revision", 0)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        problems.append(f"revision: must be an integer >= 0, got {revision!r}")
    defaults = _changes(doc.get("defaults", {}), "defaults", problems)
    raw = doc.get("experiments", [])
    if not isinstance(raw, list):
        problems.append("experiments: must be an array of tables ([[experiments]])")
        raw = []
    parsed = [(i, _experiment(r, f"experiments[{i}]", problems)) for i, r in enumerate(raw)]
    good = [(i, e) for i, e in parsed if e is not None]
    problems += cross_check(good)[0]
    if problems:
        raise ExperimentError(problems)
    return ExperimentSet(version, tuple(e for _, e in good), revision, defaults or Changes())


def dumps(es: ExperimentSet) -> str:
    """The set as TOML text that `loads` reads back equal (None changes omitted)."""
    lines = [f"version = {es.version}", f"revision = {es.revision}"]
    if es.defaults != Changes():
        lines += ["", "[defaults]"] + [f"{k} = {_toml(v)}" for k, v in changes_to_json(es.defaults).items()]
    for e in es.experiments:
        lines += ["", "[[experiments]]", f"id = {_toml(e.id)}", f"description = {_toml(e.description)}",
                  f"layer = {_toml(e.layer)}", f"start = {_toml_time(e.start_s)}", f"end = {_toml_time(e.end_s)}",
                  f"traffic = {_toml(e.traffic)}", f"control = {_toml(e.control)}",
                  f"kinds = [{', '.join(map(_toml, e.kinds))}]"]
        for v in e.variants:
            lines += ["", "[[experiments.variants]]", f"name = {_toml(v.name)}", f"weight = {_toml(v.weight)}"]
            changes = changes_to_json(v.changes)
            if changes:
                lines.append("changes = { " + ", ".join(f"{k} = {_toml(x)}" for k, x in changes.items()) + " }")
    return "\n".join(lines) + "\n"


def experiment_from_json(obj: Any, loc: str = "body") -> Experiment:
    """One experiment from its JSON form (the TOML table's keys; start/end as ISO-8601 with an offset or
    Unix seconds); every problem in one ExperimentError located from `loc` (e.g. body.variants[0].weight)."""
    problems: list[str] = []
    e = _experiment(obj, loc, problems, times=API_TIMES)
    if e is None or problems:
        raise ExperimentError(problems)
    return e


def experiment_to_json(e: Experiment) -> dict[str, Any]:
    """The JSON form of an experiment, times as ISO-8601 strings in UTC."""
    return {"id": e.id, "description": e.description, "layer": e.layer, "start": _iso(e.start_s),
            "end": _iso(e.end_s), "traffic": e.traffic, "control": e.control, "kinds": list(e.kinds),
            "variants": [{"name": v.name, "weight": v.weight, "changes": changes_to_json(v.changes)}
                         for v in e.variants]}


def changes_from_json(obj: Any, loc: str = "body") -> Changes:
    problems: list[str] = []
    c = _changes(obj, loc, problems)
    if c is None or problems:
        raise ExperimentError(problems)
    return c


def changes_to_json(c: Changes) -> dict[str, Any]:
    """The set fields of `c` (None omitted), sources as a list."""
    out = {k: getattr(c, k) for k in _CHANGES_KEYS if getattr(c, k) is not None}
    if "sources" in out:
        out["sources"] = list(out["sources"])
    return out


def _utc(t: float) -> dt.datetime | None:
    """t as a UTC datetime when that represents it exactly, else None (write the number instead)."""
    try:
        d = dt.datetime.fromtimestamp(t, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return d if d.timestamp() == t else None


def _iso(t: float) -> str | float:
    d = _utc(t)
    return t if d is None else d.isoformat().replace("+00:00", "Z")


def _toml_time(t: float) -> str:
    d = _utc(t)
    return repr(t) if d is None else d.isoformat().replace("+00:00", "Z")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)          # shortest text that reads back as the same float; finite by validation
    if isinstance(value, str):
        escaped = "".join(f"\\{c}" if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F
                          else c for c in value)
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def cross_check(indexed: list[tuple[int, Experiment]]) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Problems across experiments (duplicate ids, layers that cannot fit, knobs changed by two layers at
    once) and the slice layout."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, e in indexed:
        if e.id in seen:
            problems.append(f"experiments[{i}].id: duplicate id {e.id!r} (also experiments[{seen[e.id]}])")
        seen.setdefault(e.id, i)
    slices: dict[str, tuple[float, float]] = {}
    placed: list[tuple[int, Experiment]] = []
    for i, e in sorted(indexed, key=lambda p: (p[1].start_s, p[1].id)):
        rivals = [(j, o) for j, o in placed if o.layer == e.layer and o.start_s < e.end_s and e.start_s < o.end_s]
        lo = _first_fit(e.traffic, sorted(slices[o.id] for _, o in rivals))
        if lo is None:
            names = ", ".join(f"experiments[{j}] {o.id!r}" for j, o in rivals)
            total = e.traffic + sum(o.traffic for _, o in rivals)
            problems.append(f"experiments[{i}].traffic: layer {e.layer!r} cannot fit {e.id!r} ({e.traffic}) "
                            f"beside {names} running at the same time (combined traffic {total:g})")
            continue
        slices[e.id] = (lo, lo + e.traffic)
        placed.append((i, e))
    # Same-layer experiments never share a unit; across layers a unit can be in both at once.
    for n, (i, e) in enumerate(indexed):
        for j, o in indexed[n + 1:]:
            shared = e.knobs() & o.knobs()
            if (o.layer != e.layer and shared and set(e.kinds) & set(o.kinds)
                    and o.start_s < e.end_s and e.start_s < o.end_s):
                problems.append(f"experiments[{j}].variants: {o.id!r} (layer {o.layer!r}) and experiments[{i}] "
                                f"{e.id!r} (layer {e.layer!r}) both change {', '.join(sorted(shared))} while "
                                f"running at the same time; a unit in both would get colliding changes")
    return problems, slices


def _first_fit(width: float, taken: list[tuple[float, float]]) -> float | None:
    """Lowest start of a free gap of `width` in [0, 1) among sorted `taken` slices, or None."""
    lo = 0.0
    for a, b in taken:
        if a - lo >= width - WEIGHT_TOLERANCE:
            break
        lo = max(lo, b)
    return lo if lo + width <= 1.0 + WEIGHT_TOLERANCE else None


def _experiment(raw: Any, loc: str, problems: list[str],
                times: tuple[float, float] = _ANY_TIME) -> Experiment | None:
    before = len(problems)
    if not _table(raw, _EXPERIMENT_KEYS, loc, problems):
        return None
    eid = _ident(raw.get("id"), f"{loc}.id", problems)
    description = _typed(raw.get("description", ""), str, f"{loc}.description", "a string", problems)
    layer = _ident(raw.get("layer"), f"{loc}.layer", problems)
    start, end = (_time(raw.get(k), f"{loc}.{k}", problems, times) for k in ("start", "end"))
    if start is not None and end is not None and end <= start:
        problems.append(f"{loc}.end: must be after start ({end:g} <= {start:g})")
    traffic = _number(raw.get("traffic"), f"{loc}.traffic", lambda x: 0 < x <= 1, "in (0, 1]", problems)
    variants = _variants(raw.get("variants"), loc, problems)
    control = raw.get("control", variants[0].name if variants else "")
    if variants and control not in {v.name for v in variants}:
        problems.append(f"{loc}.control: unknown variant {control!r}")
    kinds = raw.get("kinds", list(KINDS))
    if (not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds)
            or len(set(kinds)) != len(kinds)):
        problems.append(f"{loc}.kinds: must be a non-empty list of distinct kinds from {list(KINDS)}, got {kinds!r}")
    # Every check that returns None has added a problem: the None tests only narrow the types.
    if len(problems) > before or eid is None or layer is None or start is None or end is None or traffic is None:
        return None
    return Experiment(eid, description, layer, start, end, traffic, variants, control, tuple(kinds))


def _variants(raw: Any, loc: str, problems: list[str]) -> tuple[Variant, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{loc}.variants: must be a non-empty array of tables ([[experiments.variants]])")
        return ()
    out, names = [], set()
    for k, r in enumerate(raw):
        vloc = f"{loc}.variants[{k}]"
        if not _table(r, _VARIANT_KEYS, vloc, problems):
            continue
        name = _ident(r.get("name"), f"{vloc}.name", problems)
        if name is not None and name in names:
            problems.append(f"{vloc}.name: duplicate variant name {name!r}")
        names.add(name)
        weight = _number(r.get("weight"), f"{vloc}.weight", lambda x: 0 < x <= 1, "in (0, 1]", problems)
        changes = _changes(r.get("changes", {}), f"{vloc}.changes", problems)
        if name is not None and weight is not None and changes is not None:
            out.append(Variant(name, weight, changes))
    if len(out) == len(raw):
        total = math.fsum(v.weight for v in out)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            problems.append(f"{loc}.variants: weights must sum to 1, got {total!r}")
    return tuple(out)


def _changes(raw: Any, loc: str, problems: list[str]) -> Changes | None:
    before = len(problems)
    if not _table(raw, set(_CHANGES_KEYS), loc, problems):
        return None
    sources = raw.get("sources")
    if sources is not None:
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
            problems.append(f"{loc}.sources: must be a non-empty array of source names")
        else:
            unknown = [s for s in sources if s not in SOURCES]
            if unknown:
                problems.append(f"{loc}.sources: unknown source(s) {unknown}; known: {list(SOURCES)}")
            if len(set(sources)) != len(sources):
                problems.append(f"{loc}.sources: duplicate source names")
            sources = tuple(sources)
    ranker = raw.get("ranker")
    if isinstance(ranker, int) and not isinstance(ranker, bool):
        ranker = str(ranker)     # `ranker = 3` in TOML means MLflow version "3"
    if ranker is not None and not (isinstance(ranker, str) and _RANKER.match(ranker)):
        problems.append(f"{loc}.ranker: must be an MLflow version number or alias, got {ranker!r}")
    candidates = _count(raw.get("candidates"), f"{loc}.candidates", MAX_CANDIDATES, problems)
    per_category = _count(raw.get("max_per_category"), f"{loc}.max_per_category", 1000, problems, least=0)  # 0: no cap
    exclude = raw.get("exclude_purchased")
    if exclude is not None and not isinstance(exclude, bool):
        problems.append(f"{loc}.exclude_purchased: must be true or false, got {exclude!r}")
    if len(problems) > before:
        return None
    return Changes(sources, ranker, candidates, per_category, exclude)


def _table(raw: Any, known: set[str], loc: str, problems: list[str]) -> bool:
    """Whether `raw` is a TOML table (else a problem); a table's unknown keys are reported as problems."""
    if not isinstance(raw, dict):
        problems.append(f"{loc}: must be a table")
        return False
    _unknown_keys(raw, known, loc, problems)
    return True


def _unknown_keys(raw: Mapping[str, object], known: set[str], loc: str, problems: list[str]) -> None:
    for key in sorted(set(raw) - known):
        problems.append(f"{loc + '.' if loc else ''}{key}: unknown key; expected one of {sorted(known)}")


def _typed(value: Any, kind: type, loc: str, what: str, problems: list[str]) -> Any:
    if not isinstance(value, kind):
        problems.append(f"{loc}: must be {what}, got {value!r}")
        return None
    return value


def _ident(value: Any, loc: str, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        problems.append(f"{loc}: required; 1-64 letters, digits, '_', '-', '.', got {value!r}")
        return None
    return value


def _number(value: Any, loc: str, ok: Callable[[float], bool], what: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        problems.append(f"{loc}: must be a number {what}, got {value!r}")
        return None
    return float(value)


def _count(value: Any, loc: str, most: int | None, problems: list[str], least: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        problems.append(f"{loc}: must be an integer in {least}..{most if most else 'inf'}, got {value!r}")
        return None
    return value


def _time(value: Any, loc: str, problems: list[str], within: tuple[float, float] = _ANY_TIME) -> float | None:
    """A TOML offset datetime, an ISO-8601 string or Unix seconds -> Unix seconds, `within` the bounds;
    naive times are ambiguous, so refused."""
    t = _timestamp(value, loc, problems)
    if t is not None and not within[0] <= t <= within[1]:
        problems.append(f"{loc}: must be from {_iso(within[0])} to {_iso(within[1])} "
                        f"(Unix seconds {within[0]:.0f} to {within[1]:.0f}), got {t:g}")
        return None
    return t


def _timestamp(value: Any, loc: str, problems: list[str]) -> float | None:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            problems.append(f"{loc}: not an ISO-8601 datetime (e.g. 2025-01-01T00:00:00Z), got {value!r}")
            return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            problems.append(f"{loc}: datetime needs a UTC offset (e.g. 2025-01-01T00:00:00Z)")
            return None
        return value.timestamp()
    return _number(value, loc, lambda x: True, "(Unix seconds) or an offset datetime", problems)
