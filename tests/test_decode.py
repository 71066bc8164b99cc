"""decode_crop on any image prepare accepts: every width and height, mode (L, RGB, CMYK, P, RGBA),
JPEG or PNG, output size and crop draw gives uint8 [3, S, S]. Property-based (hypothesis) and a
seeded sweep of 10,000 draws over real encoded files."""
import io
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bkd_core.data.parquet import decode_crop

MODES = {"JPEG": ("L", "RGB", "CMYK"), "PNG": ("L", "RGB", "P", "RGBA")}


def encode(width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@st.composite
def images(draw):
    fmt = draw(st.sampled_from(sorted(MODES)))
    return encode(draw(st.integers(1, 900)), draw(st.integers(1, 900)), draw(st.sampled_from(MODES[fmt])), fmt,
                  draw(st.integers(0, 1000)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=images(), size=st.integers(8, 256), train=st.booleans(), crop_seed=st.integers(0, 2**32 - 1))
def test_any_image_decodes_to_the_asked_size(data, size, train, crop_seed):
    out = decode_crop(data, size, train, random.Random(crop_seed))
    assert out.shape == (3, size, size) and str(out.dtype) == "torch.uint8"


@pytest.mark.parametrize("width, height", [(223, 320), (325, 200), (773, 74), (1, 900), (900, 1), (3, 3)])
def test_the_sizes_that_crashed_the_draft_decode(width, height):
    data = encode(width, height, "RGB", "JPEG", 0)
    rng = random.Random(0)
    for size in (8, 32, 64, 224):
        for _ in range(50):
            assert decode_crop(data, size, True, rng).shape == (3, size, size)
        assert decode_crop(data, size, False, rng).shape == (3, size, size)


def test_a_seeded_sweep_of_ten_thousand_draws():
    """200 JPEGs of 20-480 px on each side, 50 draws each (image size, train or val crop, crop box)."""
    rng = random.Random(0)
    failures = []
    for i in range(200):
        width, height = rng.randint(20, 480), rng.randint(20, 480)
        data = encode(width, height, "RGB" if i % 4 else "L", "JPEG", i)
        for _ in range(50):
            size, train = rng.choice((8, 16, 32, 64, 112)), rng.random() < 0.8
            try:
                assert decode_crop(data, size, train, rng).shape == (3, size, size)
            except Exception as exc:  # collected: the message lists every failing draw
                failures.append((width, height, size, train, repr(exc)))
    assert not failures, f"{len(failures)} of 10,000 draws failed, e.g. {failures[:5]}"
