"""Quantized lanes (kernels/lanes.py): GGUF blocks become lanes bit-exactly (against gguf's
own dequantization, on odd shapes and on random blocks a quantizer would never write), a
corrupt block is refused, int8/int4 quantization at load keeps every weight within half a
step with the scale its group's maximum fixes, and concatenating lanes of different widths
and groups loses nothing."""
import gguf
import numpy as np
import pytest
import torch
from gguf_files import random_blocks

import kernels
from kernels import GGUF_LANE_TYPES, Lanes

QUANTIZABLE = [t for t in GGUF_LANE_TYPES if "quantize_blocks" in vars(getattr(gguf.quants, t))]


def _shape(type_name: str) -> tuple[int, int]:
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    return (5, 2 * block) if block == 256 else (37, 64)    # rows not a multiple of 16


def _reference(type_name: str, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", GGUF_LANE_TYPES)
def test_random_blocks_decode_bit_exactly(type_name: str) -> None:
    n, k = _shape(type_name)
    raw = random_blocks(type_name, n, k, seed=len(type_name) + n)
    lanes = kernels.from_gguf(type_name, raw, (n, k))
    want = _reference(type_name, raw)
    assert want.shape == (n, k) and lanes.shape == (n, k)
    got = lanes.dequantize().numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)
    lo, hi = (0, 15) if lanes.bits == 4 else (-128, 127)
    assert lanes.values.dtype == torch.int8
    assert lo <= int(lanes.values.min()) and int(lanes.values.max()) <= hi
    assert len(torch.unique(lanes.values)) > 8      # random blocks use the whole range


@pytest.mark.parametrize("type_name", GGUF_LANE_TYPES)
@pytest.mark.parametrize("scale", [-4e-3, 3e-6, 0.0, 6e4])     # negative, subnormal, zero, big
def test_edge_scales_decode_bit_exactly(type_name: str, scale: float) -> None:
    n, k = _shape(type_name)
    raw = random_blocks(type_name, n, k, seed=8)
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    blocks = raw.reshape(-1, size)
    at = 208 if type_name == "Q6_K" else 0
    blocks[::2, at:at + 2] = np.array([scale], dtype=np.float16).view(np.uint8)
    got = kernels.from_gguf(type_name, raw, (n, k)).dequantize().numpy()
    assert np.array_equal(got, _reference(type_name, raw))


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantized_weights_decode_bit_exactly(type_name: str) -> None:
    rng = np.random.default_rng(1)
    for n, k in ((37, 64), (3, 96), (16, 32)):
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])
        got = kernels.from_gguf(type_name, raw, (n, k)).dequantize().numpy()
        assert np.array_equal(got, _reference(type_name, raw))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_corrupt_blocks_are_refused(type_name: str) -> None:
    n, k = _shape(type_name)
    raw = random_blocks(type_name, n, k, seed=3)
    scale_at = 208 if type_name == "Q6_K" else 0
    bad = raw.copy()
    bad[2, scale_at:scale_at + 2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match=f"{type_name}.*corrupt"):
        kernels.from_gguf(type_name, bad, (n, k))
    with pytest.raises(ValueError, match=type_name):
        kernels.from_gguf(type_name, raw[:-1], (n, k))      # a row of blocks short
    with pytest.raises(ValueError):
        kernels.from_gguf(type_name, raw.reshape(-1)[:-3], (n, k))    # not whole blocks


def test_infinite_scale_is_refused() -> None:
    raw = random_blocks("Q8_0", 4, 64, seed=4)
    raw[1, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="corrupt"):
        kernels.from_gguf("Q8_0", raw, (4, 64))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_within_half_a_step(bits: int, group: int) -> None:
    gen = torch.Generator().manual_seed(bits * group)
    w = torch.randn(37, 256, generator=gen) * torch.rand(37, 1, generator=gen)
    w[3, :group] = 0.0                                     # an all-zero group
    lanes = kernels.quantize(w, bits, group)
    assert lanes.bits == bits and lanes.group == group and lanes.shape == (37, 256)
    blocks = w.reshape(37, -1, group)
    if bits == 8:
        want = blocks.abs().amax(-1) / 127
    else:       # the largest magnitude, with its sign, lands on -8
        want = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))[..., 0] / -8
    torch.testing.assert_close(lanes.scales, want, rtol=0, atol=0)
    scale = lanes.scales.abs().repeat_interleave(group, dim=1)
    err = (lanes.dequantize() - w).abs()
    q = lanes.values.int() - (8 if bits == 4 else 0)
    # 4 bits: a weight opposite the extreme, up to 8 steps away, is clipped to 7: one step
    steps = torch.where(q == 7, 1.0, 0.5) if bits == 4 else 0.5
    assert bool((err <= scale * steps * (1 + 1e-5) + 1e-7).all())
    if bits == 4:
        assert 0 <= int(lanes.values.min()) and int(lanes.values.max()) <= 15
        torch.testing.assert_close(lanes.mins, -8 * lanes.scales, rtol=0, atol=0)
        top = q.reshape(37, -1, group).amin(-1)     # the extreme weight's step
        assert bool((top[blocks.abs().amax(-1) > 0] == -8).all())
    else:
        assert lanes.mins is None and int(q.abs().max()) <= 127
        # each group's largest weight lands on the top step: the scale is not too large
        top = q.reshape(37, -1, group).abs().amax(-1)
        assert bool((top[blocks.abs().amax(-1) > 0] == 127).all())
    assert bool((lanes.dequantize()[3, :group] == 0).all())


def test_quantize_rejects_bad_settings() -> None:
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize(w, 3, 32)
    with pytest.raises(ValueError, match="group size 48"):
        kernels.quantize(w, 8, 48)
    with pytest.raises(ValueError, match="group size 30"):
        kernels.quantize(w, 8, 30)


def _parts() -> list[Lanes]:
    gen = torch.Generator().manual_seed(5)
    q6 = kernels.from_gguf("Q6_K", random_blocks("Q6_K", 5, 256, seed=6), (5, 256))   # group 16
    q41 = kernels.from_gguf("Q4_1", random_blocks("Q4_1", 7, 256, seed=7), (7, 256))  # 4 bits, mins
    return [kernels.quantize(torch.randn(9, 256, generator=gen), 4, 128), q6,
            kernels.quantize(torch.randn(3, 256, generator=gen), 8, 64), q41]


def test_concat_is_lossless() -> None:
    parts = _parts()
    both = Lanes.concat(parts)
    assert both.bits == 8 and both.group == 16 and both.mins is not None
    assert both.shape == (24, 256)
    assert torch.equal(both.dequantize(), torch.cat([p.dequantize() for p in parts]))
    four = Lanes.concat([parts[0], parts[3]])       # 4-bit parts stay 4-bit
    assert four.bits == 4 and four.group == 32
    assert torch.equal(four.dequantize(), torch.cat([parts[0].dequantize(),
                                                     parts[3].dequantize()]))
    rows = both.rows(torch.tensor([23, 0, 9]))
    assert torch.equal(rows.dequantize(), both.dequantize()[[23, 0, 9]])


def test_concat_refuses_mismatched_parts() -> None:
    a = kernels.quantize(torch.randn(4, 96), 8, 32)
    with pytest.raises(ValueError, match="cannot stack"):
        Lanes.concat([a, kernels.quantize(torch.randn(4, 64), 8, 32)])
    wide = Lanes(a.values, torch.ones(4, 2), None, 8)      # groups of 48 inputs
    with pytest.raises(ValueError, match="do not nest"):
        Lanes.concat([a, wide])
