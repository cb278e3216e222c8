"""LoRAs per request through the real runtime factory and a real worker on SQLite (issue 15): the factory
installs the slots and the library from the settings, the pipeline holds a request's set for its loop, the
worker runs jobs with `loras` in their params, refuses unknown ones as `invalid_lora`, and publishes its library."""

import threading

import pytest
import torch
from safetensors.torch import save_file

from wanrt.config import Settings
from wanrt.jobs.paths import DataPaths
from wanrt.jobs.store import SqliteJobStore
from wanrt.jobs.worker import Worker
from wanrt.lora_request import parse_loras, published_loras
from wanrt.params import GenerateParams
from wanrt.runtime.factory import build_runtime
from wanrt.runtime.lora import LoraError, LoraLinear
from wanrt.runtime.video import probe_mp4

from conftest import make_image, queue_job
from lora_fixtures import TARGETS, as_format, random_lora

PARAMS = GenerateParams(prompt="a cat", steps=2, frames=5, width=64, height=64, cfg_high_noise=3.5,
                        cfg_low_noise=1.0, seed=3)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("served_loras")
    high = tiny_model.transformer_high
    save_file(as_format(random_lora(high, rank=4, seed=1, alpha=2.0), "comfy"), str(d / "style.safetensors"))
    save_file(as_format(random_lora(high, rank=8, seed=2, targets=TARGETS[1:]), "peft"), str(d / "motion.safetensors"))
    return d


@pytest.fixture(scope="module")
def runtime(lora_dir):
    return build_runtime(Settings(model="tiny", device="cpu", dtype="fp32", lora_dir=str(lora_dir), max_lora_rank=16,
                                  lora_allow_unmatched=True))


def test_factory_installs_slots_and_library_from_settings(runtime, lora_dir):
    assert runtime.loras is not None and runtime.loras.library.available() == {"style", "motion"}
    assert runtime.loras.library.allow_unmatched  # the setting, on every command that builds a runtime
    for expert in runtime.model.experts.values():  # the experts the eager backend runs carry the slots
        assert any(isinstance(m, LoraLinear) for m in expert.modules())
    plain = build_runtime(Settings(model="tiny", device="cpu", dtype="fp32"))
    assert plain.loras is None  # no directory: no slots, nothing added to the forward
    assert not any(isinstance(m, LoraLinear) for m in plain.model.transformer_high.modules())
    with pytest.raises(LoraError, match="no LoRAs per request"):
        plain.generate(PARAMS, make_image(64, 64), None, loras=[{"name": "style"}])


def test_generate_with_loras_then_without_is_the_base_again(runtime):
    image = make_image(64, 64)
    base = runtime.generate(PARAMS, image, None).latents
    loras = parse_loras([{"name": "style", "strength": 0.8}, {"name": "motion", "strength": -0.5, "expert": "low"}],
                        runtime.loras.library.available())
    timings: dict = {}
    styled = runtime.generate(PARAMS, image, None, loras=loras, timings=timings).latents
    assert "lora_s" in timings and (styled - base).abs().max().item() > 1e-3
    assert torch.equal(runtime.generate(PARAMS, image, None, loras=loras).latents, styled)  # loaded: a skip
    assert torch.equal(runtime.generate(PARAMS, image, None).latents, base)  # zeroed rows: the base, bit for bit
    with pytest.raises(LoraError, match="unknown LoRA 'nope'"):
        runtime.generate(PARAMS, image, None, loras=[{"name": "nope", "strength": 1.0, "expert": "both"}])
    assert torch.equal(runtime.generate(PARAMS, image, None).latents, base)  # a refused set leaves nothing behind


def queue(paths, store, loras=None, seed=0):
    p = GenerateParams(prompt="x", width=64, height=64, frames=5, steps=2, seed=seed)
    return queue_job(paths, store, p, **({"loras": loras} if loras else {}))


def test_worker_runs_lora_jobs_refuses_unknown_and_publishes_its_library(tmp_path, runtime, lora_dir):
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2, lora_dir=str(lora_dir), max_lora_rank=16)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    ok = queue(paths, store, [{"name": "style", "strength": 1.0, "expert": "both"}])
    unknown = queue(paths, store, [{"name": "gone", "strength": 1.0, "expert": "both"}])
    plain = queue(paths, store)
    worker = Worker(settings, "w", store=store, pipeline=runtime)
    t = threading.Thread(target=worker.run, kwargs={"poll_s": 0.05, "max_jobs": 3})
    t.start()
    t.join(300)
    assert store.get(ok).status == "completed" and probe_mp4(store.get(ok).video_path)["frames"] == 5
    failed = store.get(unknown)
    assert failed.status == "error" and failed.error_type == "invalid_lora" and failed.retryable is False
    assert "unknown LoRA 'gone'" in failed.error
    assert store.get(plain).status == "completed"
    report = store.workers()[0]
    assert report["state"] == "stopped" and published_loras([report], now=report["updated_at"]) == ([], None)
    listing, available = published_loras([report | {"state": "idle"}], now=report["updated_at"])  # as while it ran
    assert available == {"style", "motion"}
    assert {e["name"]: e["rank"] for e in listing} == {"motion": 8, "style": 4}


def test_worker_prefers_the_loaded_set_within_the_fairness_bound(tmp_path, runtime):
    skip = 2
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2, lora_affinity_skip=skip, lora_affinity_wait_s=600.0)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    sets = {"A": [{"name": "style", "strength": 1.0, "expert": "both"}],
            "B": [{"name": "motion", "strength": 0.5, "expert": "both"}]}
    order = "ABABABAB"
    ids = [queue(paths, store, sets[k], seed=i) for i, k in enumerate(order)]
    runtime.loras.apply_request(runtime.loras.library, [])  # start from the base: the first job is a swap either way

    def swaps():
        return sum(s["swaps"] for s in runtime.loras.describe()["experts"].values())

    before = swaps()
    Worker(settings, "w", store=store, pipeline=runtime).run(poll_s=0.01, max_jobs=len(ids))
    jobs = [store.get(i) for i in ids]
    assert all(j.status == "completed" for j in jobs)
    ran = sorted(range(len(jobs)), key=lambda i: jobs[i].started_at)
    runs = [order[i] for i in ran]
    changes = 1 + sum(a != b for a, b in zip(runs, runs[1:], strict=False))  # set changes = swaps per expert
    assert (swaps() - before) == 2 * changes  # both experts swap on each change
    assert changes < len(order)  # FIFO would change sets on every job
    for pos, i in enumerate(ran):  # no job is passed over by more than `skip` younger jobs
        assert sum(1 for j in ran[:pos] if j > i) <= skip, runs
