"""fp8 (e4m3) KV cache entries in Triton, by integer arithmetic on their bytes.

The launchers pass an fp8 cache as its ``uint8`` view: Triton's own e4m3 type needs sm_89 or
newer, and the cache must work on sm_80 too. ``to_e4m3`` rounds fp32 to nearest even and
saturates at +-448 as ``kernels.reference.to_cache`` does (bit for bit; NaN -> 0x7f);
``from_e4m3`` gives fp16 values 2^-8 times the entries' (exact: e4m3's bits shifted into
fp16's), so the caller folds 256 into its scale; NaN entries stay NaN.
"""
import triton
import triton.language as tl

E4M3_UNIT = 256.0       # from_e4m3's values times this are the entries'


@triton.jit
def to_e4m3(x):
    """fp32 ``x`` -> e4m3 bytes (uint8)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(x), 448.0)
    ab = a.to(tl.uint32, bitcast=True)
    # normal results: round fp32's mantissa to 3 bits (ties to even), rebias the exponent
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    # below 2^-6: multiples of 2^-9, rounded by the 2^23 trick (8 is 2^-6, encoded alike)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    out = tl.where(a < 0.015625, sub, normal)
    out = tl.where(x != x, 0x7F, out)
    return (out | sign).to(tl.uint8)


@triton.jit
def from_e4m3(b):
    """e4m3 bytes (uint8) -> fp16 values 2^-8 times theirs."""
    h = b.to(tl.uint16)
    half = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return tl.where((h & 0x7F) == 0x7F, float("nan"), half)
