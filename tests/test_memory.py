"""Memory plan: which expert is resident when, on CPU (the copies are real, host and device are the same)."""

import torch

from wanrt.params import GenerateParams
from wanrt.runtime.backends.eager import EagerBackend
from wanrt.runtime.memory import ExpertSwapper, OffloadingBackend, choose_plan, estimate_plan
from wanrt.runtime.pipeline import WanI2VPipeline

P = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=4)


def test_plan_choice(tiny_model):
    assert choose_plan(tiny_model, "cpu").mode == "resident"
    assert choose_plan(tiny_model, "cpu", free_bytes=10).mode == "offload"
    assert estimate_plan("tiny", "cpu", torch.float32).mode == "resident"
    assert estimate_plan("x", "cpu", torch.float32, "offload").mode == "offload"


def test_offloading_swaps_once_per_request_and_prefetches_for_the_next(tiny_model, image64):
    import copy

    model = copy.copy(tiny_model)
    model.transformer_high = copy.deepcopy(tiny_model.transformer_high)
    model.transformer_low = copy.deepcopy(tiny_model.transformer_low)
    log = []
    swapper = ExpertSwapper(model.experts, "cpu", log=log)
    backend = OffloadingBackend(EagerBackend(model), swapper)
    ref = WanI2VPipeline(tiny_model).generate(P, image64, None).latents
    log.clear()
    got = WanI2VPipeline(model, backend).generate(P, image64, None).latents
    assert torch.equal(got, ref)
    # 2 high steps, then one swap to low, 2 low steps, then high comes back for the next request
    assert log == [("load", "high"), ("evict", "high"), ("load", "low"), ("evict", "low"), ("prefetch", "high")]
    log.clear()
    WanI2VPipeline(model, backend).generate(P, image64, None)
    assert log[0] == ("evict", "high") or log[0] == ("load", "low")  # high was already there: no load at start
    assert ("load", "high") not in log
    assert backend.describe()["memory"] == "offload"
