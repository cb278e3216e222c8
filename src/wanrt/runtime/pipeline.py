"""One request -> MP4: text encode -> first-frame VAE encode + mask -> two-expert loop -> VAE decode -> H.264.

Mirrors diffusers' WanImageToVideoPipeline maths (tests/test_parity.py holds us to it) with our own loop, so
faster backends slot in under `denoise`, the decode streams into the MP4 writer, and every stage is timed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from wanrt.model.components import WanI2VModel
from wanrt.params import GenerateParams
from wanrt.runtime import sampler as sampling
from wanrt.runtime.image import fit_image, image_to_tensor
from wanrt.runtime.vae import decode_stream, encode_condition, to_uint8_frames
from wanrt.runtime.video import Mp4Writer

log = logging.getLogger("wanrt.pipeline")

ProgressFn = Callable[[float, str], None]
PreviewFn = Callable[[int, int, torch.Tensor], None]  # (step index, steps, x0): runtime.preview.LivePreview

# The stages that run on the device (the MP4 encode runs on the CPU, on a writer thread beside the decode): their sum is a
# job's GPU-seconds (device seconds on a CPU run).
DEVICE_STAGES = ("text_encode_s", "vae_encode_s", "denoise_high_s", "denoise_low_s", "vae_decode_s")


def device_seconds(timings: dict) -> dict[str, float]:
    """{stage: seconds} of the device stages in `timings` (partial timings of a failed run included)."""
    return {k.removesuffix("_s"): float(timings[k]) for k in DEVICE_STAGES if timings.get(k)}

# Share of the progress bar each stage gets (denoise steps split the middle evenly).
_P_TEXT, _P_ENCODE, _P_LOOP_END = 2.0, 5.0, 90.0


@dataclass
class GenerateResult:
    path: Path | None
    frames_generated: int
    frames_written: int
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    steps_per_expert: dict[str, int] = field(default_factory=dict)


class WanI2VPipeline:
    def __init__(self, model: WanI2VModel, backend=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, vae_dtype: str = "auto"):
        from wanrt.runtime.backends.eager import EagerBackend
        from wanrt.runtime.vae import decode_format

        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        decode_format(self.device, vae_dtype)  # settings.vae_dtype, checked now (resolved per decode, on its device)
        self.vae_dtype = vae_dtype
        self.mp4_queue = 2  # decoded chunks queued for the MP4 writer thread (0: encode on this thread)
        self.backend = backend or EagerBackend(model)
        self.loras = None  # runtime.lora.LoraSlotGroup when LoRAs are served per request (the factory installs it)

    # ------------------------------------------------------------------ stages
    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings, each trimmed to its own length and zero-padded to max_sequence_length."""
        from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

        max_len = self.model.max_sequence_length
        tokens = self.model.tokenizer(
            [prompt_clean(p) for p in prompts], padding="max_length", max_length=max_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        te_device = next(self.model.text_encoder.parameters()).device
        ids, mask = tokens.input_ids.to(te_device), tokens.attention_mask.to(te_device)
        hidden = self.model.text_encoder(ids, mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        out = torch.zeros_like(hidden)
        for i, n in enumerate(lengths.tolist()):
            out[i, :n] = hidden[i, :n]
        return out.to(self.device, self.dtype)

    def encode_image(self, image: Image.Image, params: GenerateParams, on_chunk=None) -> torch.Tensor:
        pixels = image_to_tensor(fit_image(image, params.width, params.height)).to(self.device)
        return encode_condition(self.model.vae, pixels, params.frames_generated, on_chunk=on_chunk).to(self.device)

    def initial_noise(self, params: GenerateParams) -> torch.Tensor:
        """Drawn on the CPU generator so the same seed gives the same noise on every device."""
        shape = (1, self.model.vae.config.z_dim, (params.frames_generated - 1) // 4 + 1, params.height // 8, params.width // 8)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    # ------------------------------------------------------------------ request
    def generate(
        self,
        params: GenerateParams,
        image: Image.Image,
        out_path: str | Path | None,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
        keep_latents: bool = False,
        preview: PreviewFn | None = None,
        timings: dict[str, float] | None = None,
        loras: list[dict] | None = None,
    ) -> GenerateResult:
        """Run one request. out_path None stops after the loop (latents only, for parity and benchmarks).

        preview(step index, steps, x0) is called after each denoising step. `timings`, when given, is filled
        as the stages end (the caller keeps what a failed or cancelled run measured). `loras`: the request's
        LoRA set (wanrt.lora_request.parse_loras), held loaded in the slots for the denoising loop."""
        timings = {} if timings is None else timings
        last = [0.0]

        def report(value: float, stage: str) -> None:
            value = max(last[0], min(100.0, value))  # monotone, whatever rounding does
            last[0] = value
            if progress is not None:
                progress(value, stage)

        def check_cancel() -> None:
            if should_cancel is not None and should_cancel():
                raise sampling.Cancelled()

        t_start = time.perf_counter()
        report(0.0, "text_encode")
        plan_scheduler = sampling.make_scheduler(self.model.scheduler_config)
        plan = sampling.plan_steps(plan_scheduler, params.steps, self.model.boundary_ratio,
                                   params.cfg_high_noise, params.cfg_low_noise, device=self.device)
        needs_uncond = any(s.uses_cfg for s in plan)

        with _timer(timings, "text_encode_s", self.device):
            prompts = [params.prompt] + ([params.negative_prompt] if needs_uncond else [])
            embeds = self.encode_text(prompts)
            context, negative = embeds[:1], (embeds[1:2] if needs_uncond else None)
        report(_P_TEXT, "vae_encode")
        check_cancel()

        def on_encode_chunk(i: int, n: int) -> None:
            report(_P_TEXT + (_P_ENCODE - _P_TEXT) * i / n, "vae_encode")
            check_cancel()

        with _timer(timings, "vae_encode_s", self.device):
            condition = self.encode_image(image, params, on_chunk=on_encode_chunk)
            latents = self.initial_noise(params)
        report(_P_ENCODE, "denoise")

        per_step = (_P_LOOP_END - _P_ENCODE) / max(1, len(plan))
        step_times = {"high": 0.0, "low": 0.0}
        step_started = [time.perf_counter()]

        def on_step(step: sampling.Step) -> None:
            _sync(self.device)
            now = time.perf_counter()
            step_times[step.expert] += now - step_started[0]
            step_started[0] = now
            report(_P_ENCODE + per_step * (step.index + 1), "denoise")

        on_x0 = None if preview is None else (lambda step, x0: preview(step.index, len(plan), x0))
        t_lora = time.perf_counter()
        with self._lora_set(loras, should_cancel, plan[0].expert if plan else "high"):
            timings["lora_s"] = time.perf_counter() - t_lora  # waiting for other sets' jobs + the swap
            step_started[0] = time.perf_counter()
            try:
                latents = sampling.sample(self.backend, plan_scheduler, plan, latents, condition, context, negative,
                                          self.dtype, on_step=on_step, should_cancel=should_cancel, on_x0=on_x0)
            except BaseException:  # cancelled or failed: its prefetched blocks leave the device (after_loop's job)
                if hasattr(self.backend, "release"):
                    try:
                        self.backend.release()
                    except Exception:  # (a CUDA error is sticky: the loop's own error is the one to report)
                        log.exception("releasing the streamed blocks after a failed loop")
                raise
            finally:  # a cancelled loop still held the device for the steps it ran
                timings["denoise_high_s"], timings["denoise_low_s"] = step_times["high"], step_times["low"]
        if hasattr(self.backend, "after_loop"):  # e.g. prefetch the next request's expert during the decode
            self.backend.after_loop()
        steps_per_expert = {e: sum(1 for s in plan if s.expert == e) for e in ("high", "low")}

        result = GenerateResult(path=None, frames_generated=params.frames_generated, frames_written=0,
                                timings=timings, steps_per_expert=steps_per_expert,
                                latents=latents if keep_latents or out_path is None else None)
        if out_path is None:
            timings["total_s"] = time.perf_counter() - t_start
            return result

        decode_s = 0.0
        n_latent = latents.shape[2]
        # Decoded frames go to the H.264 encoder on a writer thread (at most mp4_queue chunks queued, so memory
        # stays bounded) while the next chunk decodes. vae_decode_s: the decode's own time on this thread (a
        # wait for a full queue excluded); mp4_encode_s: the encoder's, measured on its thread; total_s shows
        # the overlap. The MP4's bytes are the same either way.
        size = (out_path, params.width, params.height, params.fps)
        if self.mp4_queue > 0:
            from wanrt.runtime.video import ThreadedMp4Writer

            writer = ThreadedMp4Writer(*size, max_frames=params.frames, queue_chunks=self.mp4_queue)
        else:
            writer = Mp4Writer(*size, max_frames=params.frames)
        chunks = decode_stream(self.model.vae, latents, self.vae_dtype)
        try:  # (the finally keeps what a cancelled or failed decode measured)
            t0 = time.perf_counter()
            for i, chunk in enumerate(chunks):
                frames = to_uint8_frames(chunk)  # syncs the device
                decode_s += time.perf_counter() - t0
                writer.write(frames)  # queued (a writer thread's error is raised here or by close)
                report(_P_LOOP_END + (100.0 - _P_LOOP_END) * (i + 1) / n_latent * 0.99, "vae_decode")
                check_cancel()
                t0 = time.perf_counter()
            result.path = writer.close()  # waits for the encoder to finish the queue
        except BaseException:
            writer.abort()  # stops the writer thread, removes the partial file
            raise
        finally:
            chunks.close()  # the VAE's decode session ends now (a Shuttle sends it back), not when collected
            timings["vae_decode_s"], timings["mp4_encode_s"] = decode_s, writer.encode_s
        result.frames_written = writer.frames_written
        timings["total_s"] = time.perf_counter() - t_start
        report(100.0, "done")
        return result


    def _lora_set(self, loras: list[dict] | None, should_cancel, first_expert: str):
        """The LoRA slots hold this request's set for the loop (no set: zeroed rows, the base model)."""
        if self.loras is None:
            if loras:
                from wanrt.runtime.lora import LoraError

                raise LoraError("this server serves no LoRAs per request (start it with --lora-dir, or the "
                                "backend has no LoRA slots)")
            return contextlib.nullcontext()
        # A swap writes into the experts' buffers: with an offload tier, the expert that runs first is put in
        # place first, so a prefetch still copying cannot land over freshly written buffers.
        settle = getattr(self.backend, "settle", None)
        return self.loras.using(loras, should_cancel,
                                before_apply=None if settle is None else (lambda: settle(first_expert)))


class _timer:
    def __init__(self, timings: dict, key: str, device: torch.device):
        self.timings, self.key, self.device = timings, key, device

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        _sync(self.device)
        self.timings[self.key] = time.perf_counter() - self.t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
