"""Block streaming: a module list (an expert's 40 transformer blocks, the text encoder's 24 layers) whose weights
live on the host and visit the device a few blocks at a time, and the device-memory ledger that counts them.

How a block gets to the device (CUDA): its tensors are allocated on a side stream, copied there from pinned host
memory (or straight from a memory-mapped checkpoint: the copy then stages through the driver), an event marks
the end of the copy, and the compute stream waits for that event before the block's first kernel: no
synchronisation on the hot path. Each device tensor `record_stream`s the compute stream, so the allocator only
reuses its memory once the kernels that read it have run. After the block's forward its tensors point back at
the host copies (weights never change: nothing is copied back).

How many blocks are on the device: block i's pre-hook brings i (if the prefetch has not) and starts copies of
blocks i+1..i+ahead; its post-hook drops i. The host runs ahead of the GPU, so a dropped block's memory may
still be read by queued kernels: the ledger counts it until an event recorded after its forward has passed, and
a copy that would put more than ahead+2 blocks' memory in use first waits (on the host) for the oldest dropped
block's event. The waited-for block ran two blocks ago, so the GPU never idles for it. On the CPU (tests) the
same code runs with synchronous copies, ahead+1 blocks at most, and no events.

`wrap`: after the last block, prefetch the first ones (the next forward of the same expert starts there; the
runtime drops them when the expert changes or the loop ends).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections import Counter, deque
from functools import partial
from typing import Iterable, Sequence

import torch

log = logging.getLogger("wanrt.streaming")
ALIGN = 512  # each host copy starts 512-byte aligned in its buffer: DMA-friendly, aligned for any element size


def tensors_of(module: torch.nn.Module, exclude: Iterable[torch.nn.Module] = ()) -> list[torch.Tensor]:
    """Parameters and buffers of `module`, each once (tied weights are one tensor), minus those of `exclude`."""
    skip = {id(t) for m in exclude for t in list(m.parameters()) + list(m.buffers())}
    seen, out = set(skip), []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DeviceLedger:
    """The bytes the memory tier has placed on the device, by part, counted where it places and frees them
    (weights as they are copied in and dropped, workspaces as the phase that needs them starts and ends).
    The same object runs on the GPU and in the CPU tests; `peak` is what the plan promised to keep under
    `budget`. Workspaces are priced with model/sizes.py (checked against live tensors in tests/test_memory.py)."""

    def __init__(self, budget: int | None = None, strict: bool = False):
        self.budget, self.strict = budget, strict
        self.errors = 0  # frees of more than a part holds: an accounting bug (raises when strict; tests check)
        self.now = 0
        self.peak = 0
        self.parts: Counter = Counter()  # bytes on the device now, by part
        self.at_peak: dict[str, int] = {}  # the parts when the peak was reached
        self.part_peaks: Counter = Counter()
        self.events: Counter = Counter()  # (part, "place"|"free") -> count

    def place(self, part: str, n: int) -> None:
        if n <= 0:
            return
        self.now += n
        self.parts[part] += n
        self.events[(part, "place")] += 1
        self.part_peaks[part] = max(self.part_peaks[part], self.parts[part])
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = {k: v for k, v in self.parts.items() if v}

    def free(self, part: str, n: int) -> None:
        if n <= 0:
            return
        if n > self.parts[part]:
            self.errors += 1
            if self.strict:
                raise RuntimeError(f"ledger: freeing {n} bytes of {part!r}, which holds {self.parts[part]}")
            n = self.parts[part]  # a counting slip must not fail a job
        self.now -= n
        self.parts[part] -= n
        self.events[(part, "free")] += 1

    @contextlib.contextmanager
    def hold(self, part: str, n: int):
        self.place(part, n)
        try:
            yield
        finally:
            self.free(part, n)

    def reset_peak(self) -> None:
        self.peak, self.at_peak, self.part_peaks = self.now, {k: v for k, v in self.parts.items() if v}, Counter(self.parts)

    def summary(self) -> dict:
        return {"now": self.now, "peak": self.peak, "budget": self.budget, "errors": self.errors,
                "at_peak": dict(self.at_peak), "over_budget": self.budget is not None and self.peak > self.budget}


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(device) -> torch.cuda.Stream:
    """The one side stream every BlockStreamer on `device` copies (and allocates) on. Memory freed on a stream is
    cached for that stream alone: a stream per streamer (text encoder, each expert) kept three windows of blocks
    reserved that the others could not reuse, past a 10 GB card's budget."""
    device = torch.device(device)
    if device.index is None and torch.cuda.is_available():  # "cuda" and "cuda:N" (the current one): one stream
        device = torch.device(device.type, torch.cuda.current_device())
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


class _Locked(mmap.mmap):
    """Anonymous host memory page-locked with cudaHostRegister at its exact size. Its tensors (torch.frombuffer)
    keep it alive; when the last goes, __del__ unregisters it, before the base type unmaps it."""

    address = 0

    def __del__(self):
        if self.address:
            with contextlib.suppress(Exception):  # interpreter shutdown
                # a non-blocking copy from these pages may still be in flight on a side stream (torch's own pinned
                # allocator waits on an event per copy; this memory has none): let every stream finish first, on
                # every device (registered portable: the thread collecting it may have another current device)
                has_context = getattr(torch._C, "_cuda_hasPrimaryContext", lambda i: True)
                for i in range(torch.cuda.device_count()):
                    if has_context(i):  # (synchronize would create a context, ~0.5 GB, on a GPU never used)
                        torch.cuda.synchronize(i)
                torch.cuda.cudart().cudaHostUnregister(self.address)


_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not only the one current now


def _page_lock(mapping: _Locked, buffer: torch.Tensor) -> bool:
    if int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), _PORTABLE)) == 0:
        mapping.address = buffer.data_ptr()
        return True
    # The failure stays the CUDA runtime's last error, which torch reads at its next kernel launch: take it now.
    with contextlib.suppress(RuntimeError):
        torch.zeros(1, device="cuda")
    return False


def host_copies(tensors: Sequence[torch.Tensor], cuda: bool, pin: bool = True) -> int:
    """Point `tensors` at host copies, made once; returns how many were made. A tensor keeps its own data where
    it is on the host and needs no pinning (the CPU; `pin` off: memory-mapped checkpoint tensors stay file pages,
    which pinning would copy into RAM). The others (on CUDA: host tensors not pinned yet, and tensors on the
    device now, after a tier change) become views of one buffer, each copied in and its source dropped in turn,
    and the buffer is page-locked. One buffer at its exact size, not a pin_memory() per tensor: torch's pinned
    allocator rounds every allocation up to a power of two (an FP8 A14B block of 335 MiB took 513 MiB; a
    single pin_memory() buffer would round up too)."""
    todo = [t for t in tensors if t.device.type != "cpu" or (cuda and pin and not t.is_pinned())]
    if not todo:
        return 0
    offsets, n = [], 0
    for t in todo:
        offsets.append(n)
        n += -(-t.nbytes // ALIGN) * ALIGN
    mapping = _Locked(-1, max(n, ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # fewer page faults and faster locking, where allowed
        mapping.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(mapping, dtype=torch.uint8)
    for t, offset in zip(todo, offsets, strict=True):
        t.data = buffer[offset:offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t.data)
    # Locked after the copies: pages fill as the sources go (a source on the host is freed as its copy is made).
    if cuda and not _page_lock(mapping, buffer):
        log.warning("could not page-lock %.1f GiB of host copies: they stay pageable (slower copies to the GPU)",
                    n / 2**30)
    return len(todo)


class _HostCopies:
    """A host copy per tensor, made once (host_copies): pinned on CUDA unless `pin` is off, the tensors' own data
    on the CPU."""

    def __init__(self, tensors: Sequence[torch.Tensor], cuda: bool, pin: bool = True):
        self.made = host_copies(tensors, cuda, pin)
        self.pairs = [(t, t.data) for t in tensors]
        self.nbytes = nbytes(h for _, h in self.pairs)

    def to_device(self, device: torch.device, non_blocking: bool) -> list[torch.Tensor]:
        if device.type == "cpu":
            return [h.clone() for _, h in self.pairs]  # a real copy: what the device would hold (and a mapped read)
        out = []
        for _, h in self.pairs:
            d = torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=device)
            d.copy_(h, non_blocking=non_blocking)
            out.append(d)
        return out

    def point(self, device_tensors: Sequence[torch.Tensor] | None) -> None:
        """Make the tensors use `device_tensors`, or their host copies (None)."""
        if device_tensors is None:
            for t, h in self.pairs:
                t.data = h
        else:
            for (t, _), d in zip(self.pairs, device_tensors, strict=True):
                t.data = d


class Shuttle:
    """A group of tensors (a module minus some submodules) brought to the device as one and dropped after use:
    the text encoder's embedding and norms around a streamed encode, the VAE around its encode and decode.
    Copies run on the current stream (they are needed at once; a pinned source keeps them asynchronous)."""

    def __init__(self, part: str, module: torch.nn.Module, device, ledger: DeviceLedger | None = None,
                 exclude: Iterable[torch.nn.Module] = ()):
        self.part, self.device, self.ledger = part, torch.device(device), ledger
        self.cuda = self.device.type == "cuda"
        self.host = _HostCopies(tensors_of(module, exclude), self.cuda)
        self.on_device = False
        self.trips = 0

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    def bring(self) -> None:
        if self.on_device:
            return
        self.host.point(self.host.to_device(self.device, non_blocking=self.cuda))
        self.on_device = True
        self.trips += 1
        if self.ledger is not None:
            self.ledger.place(self.part, self.nbytes)

    def send_back(self) -> None:
        if not self.on_device:
            return
        self.host.point(None)  # stream-ordered: the compute stream's later allocations reuse it after its kernels
        self.on_device = False
        if self.ledger is not None:
            self.ledger.free(self.part, self.nbytes)


class BlockStreamer:
    """Streams `blocks` through `device` with `ahead` blocks prefetched (see the module docstring)."""

    def __init__(self, part: str, blocks: Sequence[torch.nn.Module], device, ledger: DeviceLedger | None = None,
                 ahead: int = 2, wrap: bool = True, pin: bool = True):
        if ahead < 0:
            raise ValueError("ahead must be >= 0")
        self.part, self.blocks = part, list(blocks)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ledger, self.ahead, self.wrap = ledger, ahead, wrap
        # Blocks whose memory may be in use at once: the running one, `ahead` prefetched, and on a GPU the
        # previous one, whose kernels may still be queued when the host moves on.
        self.max_blocks = ahead + (2 if self.cuda else 1)
        self.host = [_HostCopies(tensors_of(b), self.cuda, pin) for b in self.blocks]
        self.block_bytes = [h.nbytes for h in self.host]
        self.counts: Counter = Counter(host_copies=sum(h.made for h in self.host))
        self.live: dict[int, torch.cuda.Event | None] = {}  # blocks on the device (host's view) -> copy event
        self.peak_live = 0
        self._freeing: deque = deque()  # (event after the block's forward, bytes): dropped, maybe still read
        self._stream = copy_stream(self.device) if self.cuda else None
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(partial(self._pre, i)))
            self._hooks.append(block.register_forward_hook(partial(self._post, i)))

    # ------------------------------------------------------------------ hooks
    def _pre(self, i: int, module, args) -> None:
        self.ensure(i)
        n = len(self.blocks)
        for k in range(1, self.ahead + 1):
            j = i + k
            if j >= n:
                if not self.wrap:
                    break
                j -= n
            if j == i:
                break
            if j not in self.live:
                self._load(j)

    def _post(self, i: int, module, args, output) -> None:
        self.drop(i)

    # ------------------------------------------------------------------ moves
    def ensure(self, i: int) -> None:
        if i not in self.live:
            self._load(i)
            self.counts["late"] += 1  # not prefetched: the first block of a forward, or ahead=0
        event = self.live[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _settle(self, wait_for: int = 0) -> None:
        """Return dropped blocks' bytes to the ledger once their forward has run; wait (host side) until at most
        `wait_for` blocks' worth of memory is still in use."""
        while self._freeing and self._freeing[0][0].query():
            self.ledger_free(self._freeing.popleft()[1])
        while self._freeing and len(self.live) + len(self._freeing) > wait_for:
            event, n = self._freeing.popleft()
            event.synchronize()
            self.counts["throttled"] += 1
            self.ledger_free(n)

    def ledger_free(self, n: int) -> None:
        if self.ledger is not None:
            self.ledger.free(self.part, n)

    def _load(self, j: int) -> None:
        if self.cuda:
            self._settle(wait_for=self.max_blocks - 1)
            with torch.cuda.stream(self._stream):  # allocated and copied on the side stream
                device_tensors = self.host[j].to_device(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            compute = torch.cuda.current_stream(self.device)
            for d in device_tensors:
                d.record_stream(compute)
        else:
            device_tensors, event = self.host[j].to_device(self.device, non_blocking=False), None
        self.host[j].point(device_tensors)
        self.live[j] = event
        self.counts["loads"] += 1
        self.peak_live = max(self.peak_live, len(self.live) + len(self._freeing))
        if self.ledger is not None:
            self.ledger.place(self.part, self.block_bytes[j])

    def drop(self, i: int) -> None:
        if i not in self.live:
            return
        del self.live[i]
        self.host[i].point(None)
        self.counts["drops"] += 1
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._freeing.append((done, self.block_bytes[i]))
        else:
            self.ledger_free(self.block_bytes[i])

    def release_all(self) -> None:
        """Drop every block on the device (prefetched for a forward that will not come now)."""
        for i in list(self.live):
            self.drop(i)

    def settle(self) -> None:
        """Wait for every dropped block's forward (tests, tier changes): the ledger then shows no block."""
        if self.cuda:
            self._settle(wait_for=0)

    def close(self) -> None:
        """Remove the hooks; the tensors keep pointing at their host copies."""
        self.release_all()
        self.settle()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def nbytes(self) -> int:
        return sum(self.block_bytes)

    def describe(self) -> dict:
        return {"blocks": len(self.blocks), "ahead": self.ahead, "wrap": self.wrap, "peak_blocks": self.peak_live,
                "block_mb": round(max(self.block_bytes, default=0) / 2**20, 1), **dict(self.counts)}


def move_to(obj, device: torch.device):
    """Tensors in (nested) args/kwargs moved to `device` (no-op for those already there)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj
