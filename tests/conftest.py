import os
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run long variants")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="long variant: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model():
    from wanrt.model.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    from wanrt.runtime.pipeline import WanI2VPipeline

    return WanI2VPipeline(tiny_model)


def make_image(width=64, height=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.05):
    """predicate()'s first truthy value within `timeout` seconds; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def queue_job(paths, store, params, image: Image.Image | None = None, **fields) -> str:
    """Queue a job on a real store the way the API does: its input is written first, then the job is created with
    it (a running worker may claim the job the moment it exists). `params` is a GenerateParams; `fields` join
    the stored params (e.g. loras)."""
    job_id = str(uuid.uuid4())
    name = f"{job_id}_input.png"
    (image or make_image(params.width, params.height)).save(paths.inputs / name)
    stored = params.to_dict() | {"frames_generated": params.frames_generated} | fields
    job, _ = store.create(stored, input_image=name, job_id=job_id)
    return job.id


@pytest.fixture
def image64():
    return make_image(64, 64)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free port, for this test session only (`make test` installs it if missing)."""
    from servers import start_redis

    try:
        proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url
    proc.terminate()
    proc.wait(10)


# ---------------------------------------------------------------------- real servers, one per test module
# A module configures them with module-level dicts: SERVER (WanrtServer arguments: workers=..., WANRT_*=...) and
# API_ONLY (the same, always without a worker). Module scope: each module gets servers of its own, never shared
# with (or changed by) another module; a module that needs another shape defines its own fixture of that name.
@pytest.fixture(scope="module")
def images():
    """The local image server (well-behaved and hostile routes, tests/servers.py)."""
    from servers import ImageServer

    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """`wanrt serve` with one worker (tiny model) unless the module's SERVER says otherwise."""
    from servers import WanrtServer

    with WanrtServer(tmp_path_factory.mktemp("server"), **getattr(request.module, "SERVER", {})) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_only(request, tmp_path_factory):
    """`wanrt serve` without a worker (jobs stay queued), with the module's API_ONLY settings."""
    from servers import WanrtServer

    with WanrtServer(tmp_path_factory.mktemp("api_only"), **{**getattr(request.module, "API_ONLY", {}),
                                                              "workers": 0}) as srv:
        yield srv
