"""msgspec structs of the seed contract, with its ranges and defaults (from wanrt.params)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from wanrt.lora_request import LORAS_JSON_SCHEMA
from wanrt.params import DEFAULT_NEGATIVE_PROMPT, FIELDS_BY_NAME, PROMPT_MAX_CHARS


def _meta(name: str) -> msgspec.Meta:
    f = FIELDS_BY_NAME[name]
    kw = dict(ge=f.lo, le=f.hi, description=f"{f.help} ({f.describe()}, default {f.default})")
    if f.multiple_of:
        kw["multiple_of"] = f.multiple_of
    return msgspec.Meta(**kw)


class GenerateRequest(msgspec.Struct, kw_only=True):
    image_url: Annotated[str, msgspec.Meta(min_length=1, max_length=16 * 1024 * 1024,
                                           description="http(s) or data: URL of the first frame (JPEG, PNG, WebP, GIF)")]
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=PROMPT_MAX_CHARS, description="what should happen")]
    negative_prompt: Annotated[str, msgspec.Meta(max_length=PROMPT_MAX_CHARS)] = DEFAULT_NEGATIVE_PROMPT
    steps: Annotated[int, _meta("steps")] = 6
    cfg_high_noise: Annotated[float, _meta("cfg_high_noise")] = 3.5
    cfg_low_noise: Annotated[float, _meta("cfg_low_noise")] = 3.5
    width: Annotated[int, _meta("width")] = 640
    height: Annotated[int, _meta("height")] = 640
    frames: Annotated[int, _meta("frames")] = 81
    fps: Annotated[int, _meta("fps")] = 16
    seed: Annotated[int, _meta("seed")] = 1
    # extensions: a signed POST of the job's status JSON to this URL on these events (the README's "Webhooks")
    webhook: Annotated[str, msgspec.Meta(min_length=1, max_length=2048, description=(
        "https URL (http only for hosts in WANRT_ALLOW_HOSTS) that gets the job's status JSON, signed as "
        "Standard Webhooks, when an event in webhook_events happens"))] | None = None
    webhook_events: Annotated[list[Literal["completed", "error", "cancelled", "progress"]], msgspec.Meta(
        min_length=1, max_length=4, description="events sent to the webhook (default: completed, error, cancelled)"
    )] | None = None
    # extension: LoRAs from the server's library (GET /loras); parse_loras checks names, strengths and experts and
    # names the entry in its 422 (the same check for multipart), the schema documents it.
    loras: Annotated[list[Any], msgspec.Meta(extra_json_schema=LORAS_JSON_SCHEMA)] | None = None


WEBHOOK_FIELDS = ("webhook", "webhook_events")
OPTIONAL_FIELDS = (*WEBHOOK_FIELDS, "loras")  # left out of the job (and its fingerprint) when not given


def request_fields(data: GenerateRequest) -> dict:
    """The fields of a request but the image source (generation parameters; webhook and LoRA ones when given)."""
    return {f: getattr(data, f) for f in GenerateRequest.__struct_fields__
            if f != "image_url" and not (f in OPTIONAL_FIELDS and getattr(data, f) is None)}


def field_error(field: str | None, message: str) -> str:
    """A 422 detail: the field, the problem, and for numeric seed fields their allowed range."""
    if field in FIELDS_BY_NAME:
        message += f" (allowed: {FIELDS_BY_NAME[field].describe()})"
    return f"{field}: {message}" if field else message


class GenerateResponse(msgspec.Struct):
    job_id: str
    status: str
    message: str


class MessageResponse(msgspec.Struct):
    message: str
