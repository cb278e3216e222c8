"""Worker groups on CPU: real processes over gloo. Ulysses and CFG parallelism give the single-process latents
(within 1e-4, fp32), token counts that do not divide included; a rank killed mid-job costs a group restart and
nothing else; a group size that does not divide the heads is refused before anything starts.

The ranks are forked from one forkserver (wanrt.jobs.group.PRELOAD imported once per session), so each group
costs its model build and its rendezvous, not the imports."""

import multiprocessing as mp
import os
import signal
import sys
import threading
import time

import pytest
import torch

from wanrt.config import Settings
from wanrt.jobs.group import PRELOAD, GroupLauncher, _free_port, model_heads, run_group_worker
from wanrt.params import GenerateParams
from wanrt.runtime.parallel import GroupConfigError, check_group_size, valid_group_sizes

from conftest import make_image, queue_job, wait_for

TOL = 1e-4
# FP8 runs: the group's GEMMs see other shapes (split, padded) than the single process's, so fp32 sums differ in
# the last bits; where that moves an activation across an e4m3 rounding boundary the step is 1/16 of it. Seen
# 7e-4 of the latents' scale on an AMX CPU (0 on others); a wrong split or gather is O(1).
FP8_TOL = 2e-3
HEADS = 4  # tiny_model_with_heads: enough heads for 4 ranks


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _run_ranks(world: int, target, *args, timeout: float = 120.0):
    """Start `world` ranks of `target(rank, world, port, *args, results)`; rank 0's results."""
    ctx = _ctx()
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, *args, results)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world
    return results.get()


# (width, height, frames, cfg_high, cfg_low, cfg_parallel): 64x64x9 has 3*4*4 = 48 tokens, 80x48x9 has
# 3*3*5 = 45 (divides neither 2 nor 4: padded). cfg_high != cfg_low mixes batch-2 and batch-1 steps in one run.
CASES = {
    2: [(64, 64, 9, 1.0, 1.0, True),  # ulysses-2
        (80, 48, 9, 3.5, 1.0, True),  # high: cfg-2 x 1 (no all-to-all), low: ulysses-2 padded 45 -> 46
        (80, 48, 9, 3.5, 3.5, False)],  # ulysses-2 on batch 2
    4: [(80, 48, 9, 1.0, 1.0, True),  # ulysses-4, 45 -> 48
        (80, 48, 9, 3.5, 1.0, True),  # high: cfg-2 x ulysses-2, low: ulysses-4
        (64, 64, 9, 3.5, 3.5, False)],  # ulysses-4 on batch 2
}
FP8 = dict(backend="compiled", fp8=True, compile=False)  # emulated FP8 linears on CPU
COMPILED = dict(backend="compiled", fp8=True, compile=True)


def _expected_local_tokens(world, case) -> set[int]:
    w, h, f, cfg_high, cfg_low, cfg_parallel = case
    tokens = ((f - 1) // 4 + 1) * (h // 16) * (w // 16)
    degrees = {world // 2 if cfg > 1 and cfg_parallel else world for cfg in (cfg_high, cfg_low)}
    return {-(-tokens // d) for d in degrees}


def _parity_rank(rank, world, port, runs, results):
    """Each run: a backend (settings) and cases; rank 0 runs every case single-process (the inner backend) and
    through the group, and reports the largest latent difference and the token counts the blocks saw."""
    import torch.distributed as dist

    from wanrt.runtime.parallel import ParallelBackend, expert_modules, tiny_heads_runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    report = []
    for options, cases in runs:
        pipe = tiny_heads_runtime(Settings(device="cpu", **options), heads=HEADS)
        inner = pipe.backend
        group = ParallelBackend(inner, device="cpu")
        seen = set()
        for module in expert_modules(inner).values():  # what actually reaches the blocks, after the split
            module.blocks[-1].register_forward_pre_hook(lambda m, args, seen=seen: seen.add(args[0].shape[1]))
        if rank:
            group.follow()
            continue
        image = make_image(96, 64)
        for case in cases:
            w, h, f, cfg_high, cfg_low, cfg_parallel = case
            params = GenerateParams(prompt="a cat waving", width=w, height=h, frames=f, steps=3,
                                    cfg_high_noise=cfg_high, cfg_low_noise=cfg_low)
            pipe.backend = inner
            ref = pipe.generate(params, image, None).latents
            pipe.backend, group.cfg_parallel = group, cfg_parallel
            seen.clear()
            got = pipe.generate(params, image, None).latents
            report.append({"options": options, "case": case, "err": (got - ref).abs().max().item(),
                           "scale": ref.abs().max().item(), "seen": set(seen)})
        from torch._dynamo.utils import counters

        group.cfg_parallel = True  # describe the default layouts
        report.append({"describe": {**group.describe(), "graph_breaks": sum(counters["graph_break"].values())}})
        group.close()
    if rank == 0:
        results.put(report)
    dist.destroy_process_group()


def _check(report, world):
    rows = [r for r in report if "case" in r]
    assert rows
    for r in rows:
        assert r["err"] <= (FP8_TOL * r["scale"] if r["options"].get("fp8") else TOL), r
        assert r["scale"] > 1.0  # the latents are not trivially small
        assert r["seen"] == _expected_local_tokens(world, r["case"]), r  # the sequence really was split
    return [r["describe"] for r in report if "describe" in r]


def test_two_ranks_match_single_process():
    report = _run_ranks(2, _parity_rank, [({}, CASES[2]), (FP8, CASES[2][1:2])])
    eager, fp8 = _check(report, 2)
    assert eager["parallel"]["layouts"] == {"batch 1": "ulysses-2", "batch 2": "cfg-2 x ulysses-1"}
    assert fp8["backend"] == "compiled+parallel" and fp8["fp8"] == "emulated"
    assert [r["pid"] for r in eager["parallel"]["ranks"]][0] != os.getpid()


def test_four_ranks_match_single_process():
    (desc,) = _check(_run_ranks(4, _parity_rank, [({}, CASES[4])]), 4)
    assert desc["parallel"]["layouts"] == {"batch 1": "ulysses-4", "batch 2": "cfg-2 x ulysses-2"}


@pytest.mark.slow
def test_compiled_backend_traces_the_collectives():
    """torch.compile (FP8 linears) traces the hooks, the all-to-alls and the gathers without a graph break."""
    report = _run_ranks(2, _parity_rank, [(COMPILED, CASES[2][1:2])], timeout=600)
    (desc,) = _check(report, 2)
    assert desc["compiled"] and desc["graph_breaks"] == 0


@pytest.mark.slow
def test_four_ranks_fp8():
    _check(_run_ranks(4, _parity_rank, [(FP8, CASES[4][:2])]), 4)


# ------------------------------------------------------------------------------------------------ start-up
def test_compiled_backend_times_attention_with_this_ranks_share_of_the_heads():
    """attn=auto times its kernels per self-attention shape; under Ulysses a rank attends over every token with
    heads / degree heads (a different shape from the single-process one, where flash and cuDNN may rank apart)."""
    from wanrt.runtime.backends.compiled import CompiledBackend
    from wanrt.runtime.parallel import SeqShard, install, tiny_model_with_heads

    model = tiny_model_with_heads(4)
    backend = CompiledBackend(model, device="cpu", fp8=False, compile=False)
    x = torch.randn(2, 36, 3, 8, 8)
    assert backend.attention_shape("high", x) == (2, 4, 3 * 4 * 4)
    shard = SeqShard()
    install(model.transformer_high, shard)
    assert backend.attention_shape("high", x) == (2, 4, 48)  # outside a parallel forward: degree 1
    shard.degree = 2  # as ParallelBackend sets it around a forward
    assert backend.attention_shape("high", x) == (2, 2, 48)


def test_group_size_must_divide_the_heads():
    check_group_size(40, 8)
    assert valid_group_sizes(40) == [2, 4, 5, 8]
    for world in (3, 6, 7):
        with pytest.raises(GroupConfigError, match=f"{world} ranks cannot split 40 attention heads.*2, 4, 5, 8"):
            check_group_size(40, world)
    assert model_heads("tiny") == 2
    assert model_heads("/nonexistent/checkpoint") == 40  # single files, random-full: the A14B


def test_bad_group_size_is_refused_before_anything_starts(capsys):
    launcher = GroupLauncher(Settings(model="tiny", device="cpu"), gpus=["0", "1", "2"])
    with pytest.raises(GroupConfigError, match="3 ranks cannot split 2 attention heads.*: 2$"):
        launcher.run()
    assert launcher.pids == []  # no process was started
    assert run_group_worker(Settings(model="tiny", device="cpu"), gpus=["0", "1", "2"]) == 2
    assert "3 ranks cannot split 2 attention heads" in capsys.readouterr().err


def _tiny_heads_factory(settings):
    from wanrt.runtime.parallel import tiny_heads_runtime

    return tiny_heads_runtime(settings, heads=HEADS)


def test_a_group_id_is_stable_and_names_its_physical_gpus(monkeypatch):
    """The launcher's default id outlives restarts (the next life re-queues the job the last one left) and differs
    between two containers on one host that each see their own two GPUs as 0,1."""
    import socket

    from wanrt.jobs.group import default_worker_id

    host = socket.gethostname()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no driver (as on CI, also on a GPU box): hostname and indices
    assert default_worker_id(["0", "1"]) == f"{host}-gpus0-1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1111,GPU-2222")
    first = default_worker_id(["0", "1"])
    assert first == default_worker_id(["0", "1"]) and first.startswith(f"{host}-gpus0-1-")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3333,GPU-4444")
    assert default_worker_id(["0", "1"]) != first
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3333,GPU-1111,GPU-2222")
    assert default_worker_id(["1", "2"]) == first.replace("gpus0-1", "gpus1-2")  # the same GPUs, other indices


def test_ranks_refuse_a_model_they_cannot_split():
    """The launcher cannot know a custom factory's model: the ranks check it and the launcher stops with why."""
    launcher = GroupLauncher(Settings(device="cpu"), gpus=["0", "1", "2"], factory=_tiny_heads_factory)
    with pytest.raises(GroupConfigError, match=r"rank \d: a worker group of 3 ranks cannot split 4 attention heads"):
        launcher.run()
    assert launcher.restarts == 0


# ------------------------------------------------------------------------------------------------ rank death
class _SlowBackend:
    """Makes each step long enough to kill a rank in the middle of the loop."""

    name = "slow"

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def denoise(self, *args):
        time.sleep(self.delay_s)
        return self.inner.denoise(*args)


def _slow_factory(settings):
    from wanrt.runtime.factory import build_runtime

    pipe = build_runtime(settings)  # the tiny model (2 heads) through the real factory
    pipe.backend = _SlowBackend(pipe.backend, 0.5)  # the kill lands mid-loop even when the test polls late
    return pipe


def test_rank_killed_mid_job_restarts_the_group_and_the_job_completes_once(tmp_path):
    from wanrt.jobs.paths import DataPaths
    from wanrt.jobs.store import SqliteJobStore
    from wanrt.runtime.video import probe_mp4

    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    params = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=8, cfg_high_noise=3.5,
                            cfg_low_noise=1.0)
    job = store.get(queue_job(paths, store, params))

    settings = Settings(model="tiny", device="cpu", data_dir=tmp_path, heartbeat_s=0.2)
    launcher = GroupLauncher(settings, gpus=["0", "1"], worker_id="group-a", factory=_slow_factory,
                             restart_delay_s=0.1)
    runner = threading.Thread(target=launcher.run)
    runner.start()
    try:
        def group_info(generation):
            for w in store.workers():
                if w["id"] == "group-a" and w["backend"]["parallel"]["generation"] == generation:
                    return w["backend"]["parallel"]

        first = wait_for(lambda: group_info(0), 60, "the first generation")
        assert first["layouts"] == {"batch 1": "ulysses-2", "batch 2": "cfg-2 x ulysses-1"}
        wait_for(lambda: (store.get(job.id).progress or 0) > 15, 60, "the job to be mid-loop")
        os.kill(first["ranks"][1]["pid"], signal.SIGKILL)  # a follower, mid-collective

        second = wait_for(lambda: group_info(1), 60, "the restarted group")
        done = wait_for(lambda: store.get(job.id).status in ("completed", "error") and store.get(job.id), 60,
                     "the job to finish")
        assert done.status == "completed", done.error
        assert done.attempts == 2
        assert sorted(p.name for p in paths.outputs.iterdir()) == [f"wanrt_{job.id}.mp4"]  # one output, no leftovers
        assert probe_mp4(done.video_path)["frames"] == 9
        assert launcher.restarts == 1
        for rank in first["ranks"]:  # the old generation is gone, rank 0 included
            with pytest.raises(ProcessLookupError):
                os.kill(rank["pid"], 0)
        assert {r["pid"] for r in second["ranks"]}.isdisjoint(r["pid"] for r in first["ranks"])
    finally:
        launcher.stop()
        runner.join(60)
    assert not runner.is_alive()
    assert store.workers()[0]["state"] == "stopped"


def test_group_worker_process_runs_a_job_and_stops_on_sigterm(tmp_path):
    """The `wanrt worker --gpus 0,1` entry (run_group_worker) in its own process, default factory: a job runs on
    the group (CFG-parallel high-noise steps, Ulysses low-noise ones), then one with a LoRA set, which the
    follower loads too; SIGTERM stops every rank cleanly."""
    import subprocess
    import sys

    from wanrt.jobs.paths import DataPaths
    from wanrt.jobs.store import SqliteJobStore
    from wanrt.runtime.video import probe_mp4

    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    params = GenerateParams(prompt="a dog", width=64, height=64, frames=9, steps=4, cfg_high_noise=3.5,
                            cfg_low_noise=1.0)
    from safetensors.torch import save_file

    from wanrt.model.tiny import build_tiny_model

    from lora_fixtures import TARGETS, as_format, random_lora

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    save_file(as_format(random_lora(build_tiny_model().transformer_high, rank=4, seed=1, targets=TARGETS), "peft"),
              str(lora_dir / "style.safetensors"))
    jobs = []
    for loras in (None, [{"name": "style", "strength": 1.0, "expert": "both"}]):  # the second on the LoRA set
        jobs.append(store.get(queue_job(paths, store, params, **({"loras": loras} if loras else {}))))
    code = ("import sys; from wanrt.config import Settings; from wanrt.jobs.group import run_group_worker; "
            f"sys.exit(run_group_worker(Settings(model='tiny', device='cpu', data_dir={str(tmp_path)!r}, "
            f"heartbeat_s=0.2, lora_dir={str(lora_dir)!r}, max_lora_rank=8), worker_id='cli-group', gpus=['0', '1']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for job in jobs:
            done = wait_for(lambda j=job: store.get(j.id).status in ("completed", "error") and store.get(j.id), 60,
                         "the job")
            assert done.status == "completed", done.error
            assert probe_mp4(done.video_path)["frames"] == 9
        ranks = wait_for(lambda: [w for w in store.workers() if w["id"] == "cli-group"], 10, "the report")[0]
        assert ranks["backend"]["backend"] == "eager+parallel"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "released by rank 0" in out  # the follower left because rank 0 released it, not by a kill
    assert "r1] INFO rank 1: loaded rank 0's LoRA set ['style']" in out  # the follower ran the LoRA job's set
    for rank in ranks["backend"]["parallel"]["ranks"]:
        with pytest.raises(ProcessLookupError):
            os.kill(rank["pid"], 0)


def _lora_rank(rank, world, port, lora_dir, results):
    """Every rank installs LoRA slots as the factory does and wires them as wanrt.jobs.group does; rank 0 runs
    the same request single-process and through the group, with a LoRA set, then without."""
    import torch.distributed as dist

    from wanrt.runtime.lora import LoraSlotGroup, request_key
    from wanrt.runtime.parallel import ParallelBackend, tiny_heads_runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pipe = tiny_heads_runtime(Settings(device="cpu"), heads=HEADS)
    inner = pipe.backend
    pipe.loras = LoraSlotGroup.install(pipe.model.experts, 8, lora_dir=lora_dir)
    events = []  # a swap tier's settle (its prefetch landed) must come before the slot buffers are written
    inner.settle = lambda expert: events.append(("settle", expert))
    apply = pipe.loras.apply_request

    def recording_apply(library, loras):
        events.append(("apply", pipe.loras.loaded_key != request_key(loras)))  # True: buffers written
        return apply(library, loras)

    pipe.loras.apply_request = recording_apply
    group = ParallelBackend(inner, device="cpu")
    group.loras = pipe.loras
    if rank:
        group.follow()
        writes = [i for i, (kind, wrote) in enumerate(events) if kind == "apply" and wrote]
        assert writes and all(events[i - 1] == ("settle", "high") for i in writes), events
    else:
        pipe.loras.on_apply = group.send_loras
        params = GenerateParams(prompt="a cat waving", width=64, height=64, frames=9, steps=3)
        image, style = make_image(96, 64), [{"name": "style", "strength": 1.0, "expert": "both"}]
        report = {}
        for name, loras in (("style", style), ("base", None)):  # through the group first: it sends each set
            pipe.backend = group
            got = pipe.generate(params, image, None, loras=loras).latents
            pipe.backend = inner
            ref = pipe.generate(params, image, None, loras=loras).latents
            report[name] = ((got - ref).abs().max().item(), ref)
        report["lora_effect"] = (report["style"][1] - report["base"][1]).abs().max().item()
        report = {k: v if k == "lora_effect" else v[0] for k, v in report.items()}
        group.close()
        results.put(report)
    dist.destroy_process_group()


def test_a_follower_on_the_swap_tier_writes_the_set_again_once_its_buffers_moved(tmp_path):
    """A follower skipped rank 0's set when its key was loaded; on the swap tier the high expert's buffers had been
    evicted and brought back from a host copy that never saw the set, so its share ran the base model from the
    second request on (rank 0's own slots notice the move and rewrite). It writes the set again now."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from wanrt.model.tiny import build_tiny_model
    from wanrt.runtime.factory import build_runtime
    from wanrt.runtime.memory import tiered
    from wanrt.runtime.parallel import ParallelBackend

    from lora_fixtures import TARGETS, as_format, random_lora

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    save_file(as_format(random_lora(build_tiny_model().transformer_high, rank=4, seed=1, targets=TARGETS), "peft"),
              str(lora_dir / "style.safetensors"))
    pipe = build_runtime(Settings(device="cpu", memory="swap", warmup=("64x64x9",), lora_dir=str(lora_dir),
                                  max_lora_rank=8))
    follower = SimpleNamespace(loras=pipe.loras, inner=pipe.backend, rank=1)
    style = [{"name": "style", "strength": 1.0, "expert": "both"}]
    t = tiered(pipe.backend)
    x, ts, ctx = torch.randn(2, 36, 3, 8, 8), torch.full((2,), 900.0), torch.randn(2, 512, 32)

    def high_scales() -> float:
        return sum(m.lora_scale.sum().item() for m in pipe.model.transformer_high.modules() if hasattr(m, "lora_scale"))

    ParallelBackend._load_loras(follower, style, "high")  # request 1
    loaded = high_scales()
    assert loaded > 0
    t.denoise("high", x, ts, ctx)
    t.denoise("low", x, ts, ctx)  # the boundary: high evicted
    t.after_loop()  # and brought back (from its host copy) for the next request
    ParallelBackend._load_loras(follower, style, "high")  # request 2, the same set
    assert high_scales() == loaded


def test_two_ranks_serve_a_lora_set_like_one_process(tmp_path):
    """Rank 0's LoRA set is loaded on every rank (each computes its share of the heads of every layer): the group
    gives the single-process latents with the LoRA, and the base ones once it is cleared."""
    from safetensors.torch import save_file

    from wanrt.runtime.parallel import tiny_model_with_heads

    from lora_fixtures import TARGETS, as_format, random_lora

    high = tiny_model_with_heads(HEADS).transformer_high
    save_file(as_format(random_lora(high, rank=4, seed=1, targets=TARGETS), "peft"), str(tmp_path / "style.safetensors"))
    report = _run_ranks(2, _lora_rank, str(tmp_path))
    assert report["lora_effect"] > 10 * TOL  # the LoRA changes the latents
    assert report["style"] <= TOL and report["base"] <= TOL, report
