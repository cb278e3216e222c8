import pytest

from wanrt.params import NUMERIC_FIELDS, GenerateParams, ParamError, frames_to_generate


def test_seed_defaults():
    p = GenerateParams.from_request({"prompt": "x"})
    assert (p.steps, p.cfg_high_noise, p.cfg_low_noise, p.width, p.height, p.frames, p.fps, p.seed) == (
        6, 3.5, 3.5, 640, 640, 81, 16, 1)
    assert p.negative_prompt  # "Default provided"


@pytest.mark.parametrize("field,value,fragment", [
    ("steps", 0, "1-20"), ("steps", 21, "1-20"), ("cfg_high_noise", 0.5, "1.0-10.0"),
    ("cfg_low_noise", 10.5, "1.0-10.0"), ("width", 1056, "256-1024"), ("height", 250, "256-1024"),
    ("width", 300, "divisible by 32"), ("frames", 15, "16-121"), ("frames", 122, "16-121"),
    ("fps", 7, "8-30"), ("fps", 31, "8-30"), ("steps", 2.5, "integer"), ("seed", 2**63, "seed"),
])
def test_out_of_range_names_field_and_range(field, value, fragment):
    with pytest.raises(ParamError) as e:
        GenerateParams.from_request({"prompt": "x", field: value})
    assert e.value.field == field
    assert field in str(e.value) and fragment in str(e.value)


def test_bounds_are_inclusive():
    for spec in NUMERIC_FIELDS:
        for v in (spec.lo, spec.hi):
            if spec.multiple_of:
                v = v - v % spec.multiple_of
            GenerateParams.from_request({"prompt": "x", spec.name: v})


def test_prompt_required():
    with pytest.raises(ParamError) as e:
        GenerateParams.from_request({"prompt": "   "})
    assert e.value.field == "prompt"


@pytest.mark.parametrize("frames,expected", [(16, 17), (17, 17), (18, 21), (50, 53), (81, 81), (120, 121), (121, 121)])
def test_frames_round_up_to_4k_plus_1(frames, expected):
    assert frames_to_generate(frames) == expected
