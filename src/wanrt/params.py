"""The request parameters of the seed contract: names, defaults and ranges, in one place.

Pure Python (no torch): the API's msgspec schema, the CLI's flags and the runtime all read this table,
so a range can never differ between them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Wan's own default negative prompt (Wan-Video/Wan2.2 shared_config.sample_neg_prompt); the seed says
# "Default provided" and this is the one the model was tuned with.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
PROMPT_MAX_CHARS = 10_000


@dataclass(frozen=True)
class FieldRange:
    """One numeric request field of the seed contract."""

    name: str
    kind: type
    default: int | float
    lo: int | float
    hi: int | float
    multiple_of: int | None = None
    help: str = ""

    def describe(self) -> str:
        rng = f"{self.lo}-{self.hi}"
        if self.multiple_of:
            rng += f", divisible by {self.multiple_of}"
        return rng

    def check(self, value) -> str | None:
        """Return an error message naming the field, or None when the value is allowed."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name} must be a number ({self.describe()})"
        if self.kind is int and not float(value).is_integer():
            return f"{self.name} must be an integer ({self.describe()})"
        if not (self.lo <= value <= self.hi):
            return f"{self.name} must be in {self.describe()}, got {value}"
        if self.multiple_of and int(value) % self.multiple_of:
            return f"{self.name} must be divisible by {self.multiple_of} ({self.describe()}), got {value}"
        return None


NUMERIC_FIELDS: tuple[FieldRange, ...] = (
    FieldRange("steps", int, 6, 1, 20, help="diffusion steps, split between the experts at the boundary"),
    FieldRange("cfg_high_noise", float, 3.5, 1.0, 10.0, help="guidance scale of the high-noise expert (1 = no uncond pass)"),
    FieldRange("cfg_low_noise", float, 3.5, 1.0, 10.0, help="guidance scale of the low-noise expert (1 = no uncond pass)"),
    FieldRange("width", int, 640, 256, 1024, 32, help="output width in pixels"),
    FieldRange("height", int, 640, 256, 1024, 32, help="output height in pixels"),
    FieldRange("frames", int, 81, 16, 121, help="frames in the video (generated at the next 4k+1, then trimmed)"),
    FieldRange("fps", int, 16, 8, 30, help="frames per second of the MP4"),
    FieldRange("seed", int, 1, INT64_MIN, INT64_MAX, help="random seed; same inputs + seed => same video"),
)
FIELDS_BY_NAME = {f.name: f for f in NUMERIC_FIELDS}


class ParamError(ValueError):
    """A request parameter is missing or out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = 6
    cfg_high_noise: float = 3.5
    cfg_low_noise: float = 3.5
    width: int = 640
    height: int = 640
    frames: int = 81
    fps: int = 16
    seed: int = 1

    def __post_init__(self):
        """Structural checks only (the runtime runs any geometry the model can: tests use 64x64x9).
        The seed contract's ranges are `validate()`, which the API and the CLI call."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ParamError("prompt", "prompt must be a non-empty string")
        if len(self.prompt) > PROMPT_MAX_CHARS:
            raise ParamError("prompt", f"prompt must be at most {PROMPT_MAX_CHARS} characters")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > PROMPT_MAX_CHARS:
            raise ParamError("negative_prompt", f"negative_prompt must be a string of at most {PROMPT_MAX_CHARS} characters")
        for spec in NUMERIC_FIELDS:
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(spec.name, f"{spec.name} must be a number ({spec.describe()})")
            if spec.kind is int and not float(value).is_integer():
                raise ParamError(spec.name, f"{spec.name} must be an integer ({spec.describe()})")
            object.__setattr__(self, spec.name, spec.kind(value))
        for name in ("width", "height"):
            if getattr(self, name) < 16 or getattr(self, name) % 16:
                raise ParamError(name, f"{name} must be a positive multiple of 16")
        for name in ("steps", "frames", "fps"):
            if getattr(self, name) < 1:
                raise ParamError(name, f"{name} must be at least 1")

    def validate(self) -> "GenerateParams":
        """Enforce the seed contract's ranges; raises ParamError naming the field and its range."""
        for spec in NUMERIC_FIELDS:
            err = spec.check(getattr(self, spec.name))
            if err:
                raise ParamError(spec.name, err)
        return self

    @property
    def frames_generated(self) -> int:
        return frames_to_generate(self.frames)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerateParams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})

    @classmethod
    def from_request(cls, data: dict) -> "GenerateParams":
        """Contract ranges first (so the message names the seed's range), then construction."""
        for spec in NUMERIC_FIELDS:
            if data.get(spec.name) is not None:
                err = spec.check(data[spec.name])
                if err:
                    raise ParamError(spec.name, err)
        return cls.from_dict(data).validate()


def frames_to_generate(frames: int, temporal_compression: int = 4) -> int:
    """The VAE needs 4k+1 frames: round up, and the MP4 writer trims back to `frames`."""
    k = -(-(frames - 1) // temporal_compression)
    return k * temporal_compression + 1


# The default request's shape bucket, "WxHxF" (the warm-up syntax; what memory plans are sized for by default).
DEFAULT_BUCKET = "x".join(str(v) for v in (FIELDS_BY_NAME["width"].default, FIELDS_BY_NAME["height"].default,
                                           frames_to_generate(FIELDS_BY_NAME["frames"].default)))
