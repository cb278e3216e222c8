"""The `loras` request field and the worker's LoRA-aware pick of the next job.

Pure Python (no torch, like params.py): the API validates with `parse_loras` (422 on ParamError), the job store
hands `pick_next` a window of queued jobs, and the runtime keys its loaded set with `request_key`, so the three
always agree on what "the same LoRA set" means.

A request's `loras` is a list of at most MAX_LORAS entries
`{"name": str, "strength": float in [-4, 4] (default 1.0), "expert": "high" | "low" | "both" (default "both")}`;
the order is the stacking order (it changes nothing mathematically, but the key keeps it so that a set is served
from bit-identical buffers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from wanrt.params import ParamError

MAX_LORAS = 8
STRENGTH_MIN, STRENGTH_MAX = -4.0, 4.0
DEFAULT_STRENGTH = 1.0
EXPERTS = ("high", "low", "both")
DEFAULT_EXPERT = "both"
_FIELDS = ("name", "strength", "expert")
LIVE_REPORT_S = 120.0  # a worker whose last report is older is taken for gone
REPORT_EVERY_S = LIVE_REPORT_S / 4  # workers re-report at least this often, idle or busy (a few missed: still live)
_SHOWN_NAMES = 20  # unknown-name messages list at most this many available names


# For the API's OpenAPI schema (msgspec.Meta(extra_json_schema=...)); parse_loras is what enforces it.
LORAS_JSON_SCHEMA = {
    "type": "array", "maxItems": MAX_LORAS,
    "description": "LoRAs from the server's library (GET /loras), stacked in this order",
    "items": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1, "description": "file name without .safetensors"},
        "strength": {"type": "number", "minimum": STRENGTH_MIN, "maximum": STRENGTH_MAX, "default": DEFAULT_STRENGTH},
        "expert": {"enum": list(EXPERTS), "default": DEFAULT_EXPERT,
                   "description": "high-noise expert, low-noise expert or both"}}},
}


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_loras(value: Any, available: set[str] | frozenset[str] | None = None) -> list[dict]:
    """Validate a request's `loras` and fill the defaults. `available`: the LoRA names the workers serve (None: do
    not check names). Raises ParamError whose field and message name the entry, e.g. `loras[2].strength`."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ParamError("loras", "loras must be a list of {name, strength, expert} objects")
    if len(value) > MAX_LORAS:
        raise ParamError("loras", f"loras must have at most {MAX_LORAS} entries, got {len(value)}")
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"loras[{i}]"
        if not isinstance(item, Mapping):
            raise ParamError(where, f"{where} must be an object with name, strength and expert")
        extra = sorted(str(k) for k in item if k not in _FIELDS)
        if extra:
            raise ParamError(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not a field of a LoRA entry "
                                                    f"(allowed: {', '.join(_FIELDS)})")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ParamError(f"{where}.name", f"{where}.name must be a non-empty string")
        if available is not None and name not in available:
            names = sorted(available)
            shown = ", ".join(names[:_SHOWN_NAMES]) + (" ..." if len(names) > _SHOWN_NAMES else "")
            raise ParamError(f"{where}.name", f"{where}.name: unknown LoRA {name!r} (available: {shown or 'none'})")
        strength = item.get("strength")
        if strength is None:
            strength = DEFAULT_STRENGTH
        rng = f"{_fmt(STRENGTH_MIN)}-{_fmt(STRENGTH_MAX)}"
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ParamError(f"{where}.strength", f"{where}.strength must be a number in {rng}")
        if not STRENGTH_MIN <= strength <= STRENGTH_MAX:
            raise ParamError(f"{where}.strength", f"{where}.strength must be in {rng}, got {_fmt(strength)}")
        expert = item.get("expert")
        if expert is None:
            expert = DEFAULT_EXPERT
        if expert not in EXPERTS:
            raise ParamError(f"{where}.expert", f"{where}.expert must be one of {', '.join(EXPERTS)}, got {expert!r}")
        for j, prev in enumerate(out):  # the same file twice on one expert only wastes rank: say so
            if prev["name"] == name and (prev["expert"] == expert or "both" in (prev["expert"], expert)):
                raise ParamError(f"{where}.name", f"{where}.name repeats {name!r} on an expert that loras[{j}] "
                                                  "already targets: give one entry with the summed strength")
        out.append({"name": name, "strength": float(strength), "expert": expert})
    return out


def lora_flag(text: str) -> dict:
    """One `--lora NAME[:STRENGTH[:EXPERT]]` of `wanrt generate` as a request entry (parse_loras checks it)."""
    name, _, rest = text.partition(":")
    strength, _, expert = rest.partition(":")
    entry: dict[str, Any] = {"name": name}
    if strength:
        try:
            entry["strength"] = float(strength)
        except ValueError:
            raise ParamError("loras", f"--lora {text!r}: strength {strength!r} is not a number "
                                      "(expected NAME[:STRENGTH[:EXPERT]])") from None
    if expert:
        entry["expert"] = expert
    return entry


def normalize(loras: Any) -> list[dict]:
    """Defaults filled in, without raising (stored jobs, old records): what `request_key` hashes."""
    out = []
    for item in loras or []:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            s = item.get("strength")
            out.append({"name": item["name"],
                        "strength": float(DEFAULT_STRENGTH if s is None or isinstance(s, bool) else s),
                        "expert": item.get("expert") or DEFAULT_EXPERT})
    return out


def request_key(loras: Any) -> str:
    """Canonical key of a LoRA set ("" for none): equal keys load bit-identical buffers."""
    items = normalize(loras)
    if not items:
        return ""
    return json.dumps([[d["name"], repr(d["strength"]), d["expert"]] for d in items], separators=(",", ":"))


def _get(job: Any, name: str, default=None):
    if isinstance(job, Mapping):
        return job.get(name, default)
    return getattr(job, name, default)


def job_lora_key(job: Any) -> str:
    """The LoRA key of a queued job (a jobs.store.Job or a mapping with `params`)."""
    params = _get(job, "params") or {}
    return request_key(params.get("loras") if isinstance(params, Mapping) else None)


def pick_next(queued_jobs: Sequence[Any], loaded_key: str | None, max_skip: int, max_wait_s: float, now: float):
    """The job to run next from a window of queued jobs (oldest first): the first job among the first
    `max_skip + 1` whose LoRA set is the one loaded (`loaded_key`, from `request_key`) or that has waited at
    least `max_wait_s` (by `created_at`); else the head. So one pick passes over at most `max_skip` jobs, never
    over an overdue one, and no job waits much past `max_wait_s` for LoRA-set affinity. `loaded_key` None
    (a worker that has loaded nothing yet) is plain FIFO. None for an empty window."""
    if not queued_jobs:
        return None
    head = queued_jobs[0]
    if loaded_key is None or max_skip <= 0:
        return head
    for job in queued_jobs[: max_skip + 1]:
        if now - float(_get(job, "created_at", now) or now) >= max_wait_s or job_lora_key(job) == loaded_key:
            return job
    return head


def report_age(worker: Mapping, now: float) -> float:
    """Seconds since a worker's report: the store's `age_s` (measured on the store's clock), else from
    `updated_at` and this host's `now`."""
    age = worker.get("age_s")
    return float(age) if age is not None else now - float(worker.get("updated_at") or 0)


def live_workers(workers: Sequence[Mapping], now: float, max_age_s: float = LIVE_REPORT_S) -> list[Mapping]:
    """The workers (`store.workers()` reports) that reported within max_age_s and have not said they stopped."""
    return [w for w in workers if report_age(w, now) <= max_age_s and w.get("state") != "stopped"]


def serves_loras(worker: Mapping) -> bool:
    """Whether a worker's report publishes a LoRA library (it runs with LoRA slots)."""
    return isinstance(worker.get("loras"), Mapping) and isinstance(worker["loras"].get("library"), list)


def published_loras(workers: Sequence[Mapping], now: float, max_age_s: float = LIVE_REPORT_S) -> tuple[list[dict], set[str] | None]:
    """What GET /loras lists and what parse_loras accepts, from the workers' reports (`store.workers()`, each
    with `updated_at` and, from a worker that serves LoRAs, `loras.library`: runtime LoraSlotGroup.describe()).

    Returns (listing, available). The listing has one entry per file name (the first live report's description,
    plus `workers`: how many live workers serve it). `available` is the names every live LoRA-serving worker can
    serve (a job may land on any of them); None when none has reported yet (the API then accepts any name and
    the worker refuses an unknown one)."""
    live = [w for w in live_workers(workers, now, max_age_s) if serves_loras(w)]
    if not live:
        return [], None
    listing: dict[str, dict] = {}
    available: set[str] | None = None
    for w in live:
        names = set()
        for entry in w["loras"]["library"]:
            name = entry.get("name")
            if not isinstance(name, str):
                continue
            if name not in listing:
                listing[name] = {**entry, "workers": 0}
            if entry.get("available"):
                listing[name]["workers"] += 1
                names.add(name)
        available = names if available is None else available & names
    return [listing[n] for n in sorted(listing)], available


def worker_max_rank(worker: Mapping) -> int | None:
    """The max_lora_rank a LoRA-serving worker's report publishes (its slots' rank, the same on both experts)."""
    experts = (worker.get("loras") or {}).get("experts")
    ranks = [e.get("max_rank") for e in experts.values() if isinstance(e, Mapping)] if isinstance(experts, Mapping) else []
    ranks = [r for r in ranks if isinstance(r, int)]
    return min(ranks) if ranks else None


def rank_problem(loras: Sequence[Mapping], workers: Sequence[Mapping], now: float,
                 max_age_s: float = LIVE_REPORT_S) -> str | None:
    """Why a request's LoRAs (parse_loras' output) cannot load on every live LoRA-serving worker (a job may land on
    any of them): on some expert, the ranks of the LoRAs it gets add up past that worker's max_lora_rank. Each
    LoRA counts with the rank its library entry publishes, its largest on one layer, so the sum is an upper bound
    of what a layer needs (LoRAs on disjoint layers may fit where this says no); the worker checks per layer.
    None when the set fits, or when no worker has published ranks yet."""
    for w in live_workers(workers, now, max_age_s):
        max_rank = worker_max_rank(w) if serves_loras(w) else None
        if max_rank is None:
            continue
        ranks = {e.get("name"): e for e in w["loras"]["library"] if isinstance(e, Mapping)}
        for expert in ("high", "low"):
            parts = []
            for d in loras:
                entry = ranks.get(d["name"]) or {}
                rank = entry.get("rank")
                touches = (entry.get("layers") or {}).get(expert, 1)  # a file that touches no layer there adds nothing
                if d["expert"] in ("both", expert) and isinstance(rank, int) and rank > 0 and touches:
                    parts.append((d["name"], rank))
            total = sum(r for _, r in parts)
            if total > max_rank:
                shown = " + ".join(f"{n} {r}" for n, r in parts)
                return (f"loras: the LoRAs on the {expert}-noise expert need rank {total} ({shown}), more than the "
                        f"workers' max_lora_rank {max_rank}: use fewer or lower-rank LoRAs on that expert, or serve "
                        f"with a larger WANRT_MAX_LORA_RANK")
    return None
