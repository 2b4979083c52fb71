"""Every Triton variant the engine can launch compiles for sm_90 and sm_80, without a GPU.

The compile runs in a subprocess with the interpreter off (``kernels/triton_variants.py``);
results are cached under ~/.cache/torchserve-llm, so only the first run on a machine pays for
the compiles (about 210 of them, 2 processes: attention, KV store and the weight-only linear
kernels). docs/kernels.md must match what it finds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=COMPILER_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path, str]:
    out = tmp_path_factory.mktemp("compile")
    result = run(["-m", "kernels.triton_variants", "--workers", "2", "--json",
                  str(out / "variants.json"), "--markdown", str(out / "kernels.md")], 1800)
    assert (out / "variants.json").exists(), result.stderr[-4000:]
    return json.loads((out / "variants.json").read_text()), out / "kernels.md", result.stdout


def test_every_variant_compiles_within_limits(compiled) -> None:
    """No compile error, shared memory within the target's limit, no fp16/bf16/fp8 spills at
    head sizes 64 and 128 (the tool's own check, printed as FAIL lines)."""
    variants, _, stdout = compiled
    assert "FAIL" not in stdout, stdout
    assert {v["target"] for v in variants} == {"sm_90", "sm_80"}
    for v in variants:
        assert v["error"] is None, v
        limit = {"sm_90": 232448, "sm_80": 166912}[v["target"]]
        assert 0 <= v["shared_bytes"] <= limit, v
        if v["kernel"] == "attention_kernel" and v["dtype"] != "fp32" \
                and v["constexprs"]["DIM_P"] in (64, 128):
            assert v["spill_stores"] == 0 and v["registers"] <= 255, v


def test_variants_cover_the_engine_grid(compiled) -> None:
    """Each cache dtype, head size, block size, GQA group and batch kind has its binary."""
    variants, _, _ = compiled
    for target in ("sm_90", "sm_80"):
        mine = [v for v in variants if v["target"] == target]
        for dtype in ("fp16", "bf16", "fp32", "fp8/fp16", "fp8/bf16"):
            # an fp8 cache's split decode merges fp32 partials into the query's dtype: the
            # same merge binary as that dtype's own
            kinds = ("prefill", "decode", "decode-split", "store") if "fp8" in dtype else \
                ("prefill", "decode", "decode-split", "merge", "store")
            for kind in kinds:
                found = [v for v in mine if v["dtype"] == dtype and kind in v["kinds"]]
                heads = sorted(h for v in found for h in v["head_dims"])
                assert heads == list(range(16, 257, 16)), (target, dtype, kind, heads)
                for v in found:
                    assert v["block_sizes"] == [16, 32], v
                    if kind != "store":
                        assert v["groups"] == list(range(1, 9)), v


def test_docs_table_is_current(compiled) -> None:
    _, markdown, _ = compiled
    assert (ROOT / "docs" / "kernels.md").read_text() == markdown.read_text(), \
        "docs/kernels.md is stale: python -m kernels.triton_variants --markdown docs/kernels.md"


OTHER_SHAPES = """
import random, torch
from kernels import triton_variants as tv
from kernels.triton_paged_attention import plan_attention
from kernels.triton_store_kv import plan_store_kv
known = {spec.key() for _, spec in tv.variants(["sm_90"])}
rng = random.Random(0)
checked = 0
for _ in range(60):
    dtype, cache_dtype = rng.choice(list(tv.CACHES.values()))
    kvh, group, d = rng.choice([1, 3, 8]), rng.randint(1, 8), rng.choice(tv.HEAD_DIMS)
    bs = rng.choice([8, 16, 32, 64])
    q_lens = [rng.choice([1, 1, 1, 7, 40]) for _ in range(rng.randint(1, 70))]
    seq_lens = [q + rng.randint(0, 3000) for q in q_lens]
    h = kvh * group
    qkv = torch.empty(sum(q_lens), (h + 2 * kvh) * d, dtype=dtype)
    cache = torch.empty(3, bs, kvh, d, dtype=cache_dtype)
    width = max(-(-s // bs) for s in seq_lens)
    launches, _ = plan_attention(qkv[:, :h * d].view(-1, h, d), cache, cache,
                                 torch.zeros(len(q_lens), width, dtype=torch.int32),
                                 torch.tensor(seq_lens, dtype=torch.int32),
                                 torch.tensor([0] + q_lens).cumsum(0).to(torch.int32),
                                 d ** -0.5, num_sms=132)
    kv = qkv[:, h * d:].view(-1, 2, kvh, d)
    launches += plan_store_kv(kv[:, 0], kv[:, 1], cache, cache,
                              torch.arange(len(kv), dtype=torch.long))
    for launch in launches:
        assert launch.specialize().key() in known, (dtype, kvh, group, d, bs, q_lens[:5])
        checked += 1
print("checked", checked)
"""


def test_other_engine_shapes_launch_known_variants() -> None:
    """Shapes outside the enumerated grid (other KV head counts, block sizes 8 and 64, long
    and odd batches) plan to binaries the grid already holds: nothing escapes the check."""
    result = run(["-c", OTHER_SHAPES], 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 120


LINEAR_SHAPES = """
import random, torch
from kernels import triton_variants as tv
from kernels.lanes import Lanes
from kernels.triton_linear import pack, plan_linear
known = {spec.key() for _, spec in tv.variants(["sm_90"])}
rng = random.Random(0)
checked = 0
for _ in range(60):
    dtype = rng.choice(list(tv.DTYPES.values()))
    bits, mins = rng.choice(list(tv.LINEAR_FORMATS.values()))
    group = rng.choice([16, 32, 64, 96, 128, 160, 256])
    n, k = rng.randint(1, 3000), group * rng.randint(1, 12)
    scales = torch.ones(n, k // group)
    packed = pack(Lanes(torch.zeros(n, k, dtype=torch.int8), scales,
                        scales if mins else None, bits))
    m = rng.choice([1, 2, 7, 16, 17, 300])
    bias = torch.empty(n, dtype=dtype) if rng.random() < 0.5 else None
    launches, _ = plan_linear(torch.empty(m, k, dtype=dtype), packed, bias, num_sms=132)
    for launch in launches:
        assert launch.specialize().key() in known, (dtype, bits, mins, group, n, k, m)
        checked += 1
print("checked", checked)
"""


def test_other_linear_shapes_launch_known_variants() -> None:
    """Weight shapes, groups (64, 160, 256 too), row counts and splits outside the enumerated
    ones plan to binaries the check already holds."""
    result = run(["-c", LINEAR_SHAPES], 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 60
