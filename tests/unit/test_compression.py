"""resist_mpi.compression: the codecs and the compressed mean on one rank (the world of one)."""
import math

import pytest
import torch

from resist_mpi.comm import init
from resist_mpi.averaging.compression import INT8_CHUNK, Codec, ErrorFeedback, compressed_mean


@pytest.mark.parametrize("name, per_value", [("float32", 4), ("float16", 2), ("bfloat16", 2), ("int8", 1)])
def test_container_sizes_count_the_real_bytes(name, per_value):
    codec = Codec(name)
    for n in (1, 7, 4096, 4097, 10_000):
        bytes_ = 4 * codec.size(n)
        scales = 4 * math.ceil(n / INT8_CHUNK) if name == "int8" else 0
        assert per_value * n + scales <= bytes_ < per_value * n + scales + 4  # padded to whole float32s


def test_half_codecs_round_like_a_cast():
    x = torch.randn(1001) * 10
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        codec = Codec(name)
        assert torch.equal(codec.decode(codec.encode(x), x.numel()), x.to(dtype).to(torch.float32))


def test_int8_scales_each_chunk_by_its_largest_magnitude():
    x = torch.zeros(2 * INT8_CHUNK + 10)
    x[:INT8_CHUNK] = torch.linspace(-1, 1, INT8_CHUNK)  # chunk 0: scale 1/127
    x[INT8_CHUNK:2 * INT8_CHUNK] = 254.0               # chunk 1: scale 2, every value 127 * 2
    codec = Codec("int8")
    enc = codec.encode(x)
    assert torch.equal(enc[:3], torch.tensor([1 / 127, 2.0, 1.0]))  # the scales travel first; all-zero chunk: 1
    y = codec.decode(enc, x.numel())
    assert torch.equal(y[INT8_CHUNK:2 * INT8_CHUNK], x[INT8_CHUNK:2 * INT8_CHUNK])
    assert torch.equal(y[2 * INT8_CHUNK:], x[2 * INT8_CHUNK:])
    assert (y[:INT8_CHUNK] - x[:INT8_CHUNK]).abs().max() <= 0.5 / 127 + 1e-7  # half a step at most
    s = torch.tensor(1 / 127)
    assert torch.equal(y[:INT8_CHUNK], torch.round(x[:INT8_CHUNK] / s) * s)


def test_error_feedback_loses_nothing_over_rounds():
    """On one rank the mean is the update rounded; the rounding error comes back next round, so the
    sum of what arrived equals the sum of the updates up to one round's rounding error."""
    c = init("self", fail_fast=False)
    fb = ErrorFeedback(c, "int8")
    x = torch.zeros(5000)
    sent = torch.zeros(5000)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        fb.mark(x)
        step = torch.randn(5000, generator=g) * 1e-3
        x += step
        sent += step
        fb.average(x)
    assert torch.allclose(x + fb.residual, sent, atol=1e-6)  # nothing accumulated but the last residual
    assert fb.residual.abs().max() < 2e-5


def test_compressed_mean_on_one_rank_is_the_rounded_value():
    c = init("self", fail_fast=False)
    u = torch.randn(3000)
    mean, err, own = compressed_mean(c, u, Codec("float16"))
    assert torch.equal(mean, u.half().float()) and own == (0, 3000)
    assert torch.equal(err, u - u.half().float())  # the mean's own rounding adds nothing on one rank


def test_a_finite_update_past_float16s_range_says_why_its_mean_is_not_finite():
    """A finite update of magnitude 7e4 becomes inf on the float16 wire: the error said only "not
    finite", as if the training had diverged."""
    from resist_mpi.errors import NonFiniteError
    fb = ErrorFeedback(init("self", fail_fast=False), "float16")
    x = torch.zeros(4)
    fb.mark(x)
    x += torch.tensor([7e4, 1.0, -7e4, 2.0])
    with pytest.raises(NonFiniteError, match="a float16 wire holds magnitudes up to 65504"):
        fb.average(x)
    fb = ErrorFeedback(init("self", fail_fast=False), "bfloat16")
    fb.mark(torch.zeros(4))
    fb.average(torch.tensor([7e4, 1.0, -7e4, 2.0]))  # bfloat16: float32's range
