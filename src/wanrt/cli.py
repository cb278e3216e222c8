"""`wanrt serve | worker | generate | build | plan | doctor`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wanrt.config import add_flags, settings_from_args
from wanrt.params import DEFAULT_NEGATIVE_PROMPT, NUMERIC_FIELDS, GenerateParams, ParamError


# ------------------------------------------------------------------------------------------------ generate
def cmd_generate(args) -> int:
    fields = {spec.name: getattr(args, spec.name) for spec in NUMERIC_FIELDS}
    try:
        params = GenerateParams.from_request(dict(prompt=args.prompt, negative_prompt=args.negative_prompt, **fields))
    except ParamError as e:
        print(f"wanrt generate: error: {e}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    from wanrt.lora_request import lora_flag, parse_loras

    try:  # names are checked against the library once the runtime has scanned it
        loras = parse_loras([lora_flag(x) for x in args.lora])
    except ParamError as e:
        print(f"wanrt generate: error: {e}", file=sys.stderr)
        return 2
    if loras and not settings.lora_dir:
        print("wanrt generate: error: --lora needs --lora-dir (the directory of LoRA files)", file=sys.stderr)
        return 2
    from wanrt.api.fetch import FetchError, load_image_source

    try:
        image = load_image_source(args.image, settings)
    except FetchError as e:
        print(f"wanrt generate: error: image: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from wanrt.runtime.factory import build_runtime

    try:
        pipeline = build_runtime(settings)
    except ValueError as e:  # settings the runtime refuses here (e.g. --deterministic with --autotune)
        print(f"wanrt generate: error: {e}", file=sys.stderr)
        return 2
    if loras:
        try:
            loras = parse_loras(loras, pipeline.loras.library.available())
        except ParamError as e:
            print(f"wanrt generate: error: {e}", file=sys.stderr)
            return 2
    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}/100 [{elapsed}<{remaining}] {postfix}")

    def progress(value: float, stage: str) -> None:
        bar.n = value
        bar.set_postfix_str(stage)
        bar.refresh()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = pipeline.generate(params, image, out, progress=progress, loras=loras or None)
    bar.close()
    summary = {"out": str(result.path), "frames": result.frames_written, "frames_generated": result.frames_generated,
               "width": params.width, "height": params.height, "fps": params.fps, "seed": params.seed,
               "steps_per_expert": result.steps_per_expert, **({"loras": loras} if loras else {}),
               "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
    print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------------ doctor
def cmd_doctor(args) -> int:
    from wanrt.doctor import report

    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {value}")
    return 0


# ------------------------------------------------------------------------------------------------ serve / worker
def cmd_serve(args) -> int:
    from wanrt.api.server import serve

    settings = settings_from_args(args, workers=0 if args.no_worker else None)
    return serve(settings)


def cmd_worker(args) -> int:
    from wanrt.jobs.worker import run_worker

    settings = settings_from_args(args)
    if settings.gpus:  # --gpus: one GPU runs a plain worker on it, several a worker group
        from wanrt.jobs.group import run_group_worker

        return run_group_worker(settings, worker_id=args.worker_id)
    if args.gpu is not None:
        settings = settings.replace(device=f"cuda:{args.gpu}")
    return run_worker(settings, worker_id=args.worker_id)


# ------------------------------------------------------------------------------------------------ plan
def cmd_plan(args) -> int:
    """The memory tier, bytes by part, peak and projected time for a card, host RAM and preset (nothing loaded)."""
    from wanrt.runtime import gpus
    from wanrt.runtime.memory import format_card_plan, plan_for_card

    try:
        gpu = gpus.get(args.gpu)
    except KeyError as e:
        print(f"wanrt plan: error: {e.args[0]}", file=sys.stderr)
        return 2
    presets = ["fast", "default", "high_quality"] if args.preset == "all" else [args.preset]
    results = [plan_for_card(gpu, args.gpu_memory, args.host_memory, preset, args.weights, args.memory)
               for preset in presets]
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "plan_obj"} for r in results], indent=2))
    else:
        print("\n\n".join(format_card_plan(r) for r in results))
    return 0


def cmd_build(args) -> int:
    from wanrt.engine_build.build import BuildOptions, build
    from wanrt.engine_build.lora import LoraError, LoraSpec

    try:
        specs = [LoraSpec.parse(x) for x in args.lora]
        result = build(BuildOptions(
            model=args.model or "tiny", loras=specs, precision=args.precision, out=Path(args.out),
            fp8_granularity=args.fp8_granularity, fp8_exclude=tuple(args.fp8_exclude),
            profiles=tuple(p for p in args.profiles.split(",") if p), onnx=not args.no_onnx,
            tensorrt=not args.no_tensorrt, allow_unmatched=args.allow_unmatched, device=args.device or "auto",
            force=args.force))
    except (LoraError, FileNotFoundError, ValueError) as e:
        print(f"wanrt build: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "cache_hit": result["cache_hit"], "key": result["key"][:12],
                      "tensorrt": result["tensorrt"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="wanrt", description="WAN 2.2 image-to-video inference server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    g = sub.add_parser("generate", help="one video from an image and a prompt")
    g.add_argument("--image", required=True, help="path, http(s) URL or data: URL")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=DEFAULT_NEGATIVE_PROMPT)
    for spec in NUMERIC_FIELDS:
        names = [f"--{spec.name}"] + ([f"--{spec.name.replace('_', '-')}"] if "_" in spec.name else [])
        g.add_argument(*names, dest=spec.name, type=_number(spec), default=spec.default,
                       help=f"{spec.help} ({spec.describe()}, default {spec.default})")
    g.add_argument("--out", default="out.mp4")
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:STRENGTH[:EXPERT]]",
                   help="a LoRA of --lora-dir by file stem, strength in [-4, 4] (1), expert high|low|both (both); "
                        "repeat to stack up to 8")
    add_flags(g, "generate")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("doctor", help="torch / CUDA / GPU / NVML / TensorRT / PyAV status")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    s = sub.add_parser("serve", help="HTTP API (port 8189) + worker processes")
    s.add_argument("--no-worker", action="store_true", help="API only; workers run elsewhere (`wanrt worker`)")
    add_flags(s, "serve")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="fuse LoRAs, quantize, export ONNX and TensorRT engines, write a manifest")
    b.add_argument("--model", help="base model (tiny, a diffusers dir, a dir of single files)")
    b.add_argument("--device")
    b.add_argument("--lora", action="append", default=[], metavar="high|low|both:PATH[:STRENGTH]")
    b.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16")
    b.add_argument("--fp8-granularity", choices=["channel", "tensor"], default="channel")
    b.add_argument("--fp8-exclude", action="append", default=[], metavar="REGEX", help="keep matching layers in BF16")
    b.add_argument("--profiles", default="small,default,large", help="TensorRT shape profiles")
    b.add_argument("--out", required=True)
    b.add_argument("--no-onnx", action="store_true")
    b.add_argument("--no-tensorrt", action="store_true")
    b.add_argument("--allow-unmatched", action="store_true", help="ignore LoRA keys that match no layer")
    b.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    b.set_defaults(func=cmd_build)

    pl = sub.add_parser("plan", help="memory tier, bytes by part, peak and projected time for a GPU (no weights loaded)")
    pl.add_argument("--gpu", default="rtx4090", help="h100, h200, a100, l40s, rtx4090, rtx3090 or rtx3080")
    pl.add_argument("--gpu-memory", type=float, help="GPU memory in GiB (default: the card's)")
    pl.add_argument("--host-memory", type=float, help="host RAM in GiB (default: not checked)")
    pl.add_argument("--preset", default="default", choices=["fast", "default", "high_quality", "all"])
    pl.add_argument("--weights", default="fp8", choices=["fp8", "bf16"],
                    help="how the experts are stored: an FP8 checkpoint or the compiled backend's FP8, or BF16")
    pl.add_argument("--memory", default="auto", choices=["auto", "resident", "swap", "offload", "stream", "mmap"],
                    help="price this tier instead of choosing one")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    w = sub.add_parser("worker", help="one GPU worker: claims jobs from the store and runs them")
    w.add_argument("--gpu", type=int, help="CUDA device index")
    w.add_argument("--worker-id", help="a stable id: a restart with it re-queues the jobs its last run left at once "
                   "(default: hostname-pid-random, new each run, whose orphans wait for their lease; with "
                   "--gpus, hostname, indices and the GPUs' UUIDs, stable)")
    add_flags(w, "worker")
    w.set_defaults(func=cmd_worker)
    return parser


def _number(spec):
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r} (allowed: {spec.describe()})") from None
        if spec.kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"not an integer: {text!r} (allowed: {spec.describe()})")
            return int(text) if text.lstrip("-").isdigit() else int(value)
        return value

    return parse


class OneLineParser(argparse.ArgumentParser):
    """Bad flags exit 2 with one line naming the field (no usage dump)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
