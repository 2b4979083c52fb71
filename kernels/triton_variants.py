"""Every Triton kernel variant the engine can launch, compiled for real GPU targets without one.

The variants come from the launch planners themselves (``plan_attention``, ``plan_store_kv``)
applied to every engine shape: cache dtype (the model's, or fp8 e4m3 under a 16-bit model) x
accepted head size x block size x GQA group 1-8 x batch kind (prefill, decode, decode split
across KV with its merge); and ``plan_linear`` for every format of quantized lanes x
activation dtype x row class (gemv, decode, prefill, split with its reduction). Plans that
specialize alike are one binary. Each binary is compiled per target by ``triton.compile``
with the ptxas in the triton wheel; the ptxas log Triton itself produces gives registers and
spills, Triton's metadata the shared memory. Results are cached by kernel source, triton
version, specialization and target, so a rerun on one machine is fast while a fresh machine
compiles everything.

Run with ``TRITON_INTERPRET`` unset (the interpreter has no compiler): tests call it as a
subprocess.

    python -m kernels.triton_variants --json out.json --markdown docs/kernels.md
"""
import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from kernels.lanes import Lanes
from kernels.reference import FP8
from kernels.triton_launch import MAX_HEAD_DIM, Specialization
from kernels.triton_linear import pack as pack_linear_lanes
from kernels.triton_linear import plan_linear
from kernels.triton_paged_attention import plan_attention
from kernels.triton_store_kv import plan_store_kv

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# name -> (query dtype, cache dtype): caches of the model's dtype, and fp8 under 16-bit models
CACHES = {**{name: (dtype, dtype) for name, dtype in DTYPES.items()},
          "fp8/fp16": (torch.float16, FP8), "fp8/bf16": (torch.bfloat16, FP8)}
HEAD_DIMS = tuple(range(16, MAX_HEAD_DIM + 1, 16))
BLOCK_SIZES = (16, 32)
GROUPS = tuple(range(1, 9))
# Targets: name -> (compute capability, SMs, opt-in shared memory per block in bytes).
TARGETS = {"sm_90": (90, 132, 232448), "sm_80": (80, 108, 166912)}
NUM_KV_HEADS = 2
CACHE_DIR = Path(os.environ.get("TORCHSERVE_LLM_CACHE", Path.home() / ".cache" / "torchserve-llm"))


@dataclass
class Variant:
    """One binary: its specialization, the engine shapes that launch it, and its numbers."""
    kernel: str
    dtype: str
    target: str
    constexprs: dict
    options: dict
    kinds: list[str] = field(default_factory=list)    # prefill, decode, decode-split, merge, store
    head_dims: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    block_sizes: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)  # weight formats (linear kernels)
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    compile_s: float = 0.0
    cached: bool = False
    error: str | None = None

    @property
    def shared_limit(self) -> int:
        return TARGETS[self.target][2]


def _batch(kind: str, dtypes: tuple[torch.dtype, torch.dtype], head_dim: int, block_size: int,
           group: int) -> dict:
    """A batch of this kind as the engine lays it out: queries are a view of fused qkv."""
    shapes = {"prefill": ([3, 1], [10, 20]),            # a prompt chunk next to a decode row
              "decode": ([1] * 80, [20] * 80),           # enough programs to fill the device
              "decode-split": ([1], [900])}              # one long sequence: flash-decoding
    q_lens, seq_lens = shapes[kind]
    num_heads = group * NUM_KV_HEADS
    width = -(-max(seq_lens) // block_size)
    qkv = torch.empty(sum(q_lens), (num_heads + 2 * NUM_KV_HEADS) * head_dim, dtype=dtypes[0])
    cache = torch.empty(2, block_size, NUM_KV_HEADS, head_dim, dtype=dtypes[1])
    starts = [0, *itertools.accumulate(q_lens)]
    return dict(query=qkv[:, :num_heads * head_dim].view(-1, num_heads, head_dim),
                k_cache=cache, v_cache=cache.clone(),
                block_tables=torch.zeros(len(q_lens), width, dtype=torch.int32),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_start_loc=torch.tensor(starts, dtype=torch.int32),
                scale=head_dim ** -0.5), qkv


def _plans(target: str) -> Iterator[tuple[str, str, int, int, int, Specialization]]:
    """(kind, dtype, head_dim, block_size, group, specialization) of every launch."""
    num_sms = TARGETS[target][1]
    for (name, dtypes), head_dim, block_size in itertools.product(CACHES.items(), HEAD_DIMS,
                                                                 BLOCK_SIZES):
        for group, kind in itertools.product(GROUPS, ("prefill", "decode", "decode-split")):
            batch, qkv = _batch(kind, dtypes, head_dim, block_size, group)
            launches, _ = plan_attention(**batch, num_sms=num_sms)
            split = len(launches) > 1
            assert split == (kind == "decode-split"), f"{kind} batch planned split={split}"
            yield kind, name, head_dim, block_size, group, launches[0].specialize()
            if split:
                yield "merge", name, head_dim, block_size, group, launches[1].specialize()
        # The engine stores K/V from views of the fused qkv output.
        kv = qkv[:, :2 * NUM_KV_HEADS * head_dim].view(-1, 2, NUM_KV_HEADS, head_dim)
        slots = torch.arange(kv.shape[0], dtype=torch.long)
        for launch in plan_store_kv(kv[:, 0], kv[:, 1], batch["k_cache"], batch["v_cache"],
                                    slots):
            yield "store", name, head_dim, block_size, 0, launch.specialize()


# Weight-only linear layers (kernels/triton_linear.py): every format of lanes (bits, mins),
# activation dtype and row class; groups and sizes are runtime values, enumerated here to show
# that they share binaries.
LINEAR_KERNELS = ("linear_kernel", "reduce_kernel")
LINEAR_FORMATS = {"8-bit": (8, False), "8-bit+min": (8, True), "4-bit+min": (4, True),
                  "4-bit": (4, False)}
LINEAR_ROWS = {"gemv": 1, "gemm-decode": 5, "gemm-prefill": 40}
LINEAR_GROUPS = (16, 32, 96, 128)


def _linear_plans(target: str) -> Iterator[tuple[str, str, str, Specialization]]:
    """(kind, dtype, format, specialization) of every launch ``plan_linear`` makes: each row
    class (decode ones also split across inputs, with the reduction), format, group, dtype."""
    num_sms = TARGETS[target][1]
    n, k = 100, 384
    for (name, dtype), (fmt, (bits, with_min)), group in itertools.product(
            DTYPES.items(), LINEAR_FORMATS.items(), LINEAR_GROUPS):
        scales = torch.ones(n, k // group)
        packed = pack_linear_lanes(Lanes(torch.zeros(n, k, dtype=torch.int8), scales,
                                         scales.clone() if with_min else None, bits))
        for kind, m in LINEAR_ROWS.items():
            x = torch.empty(m, k, dtype=dtype)
            for splits, bias in ((1, None), (1, torch.empty(n, dtype=dtype)), (2, None)):
                launches, _ = plan_linear(x, packed, bias, num_splits=splits, num_sms=num_sms)
                yield kind, name, fmt, launches[0].specialize()
                if len(launches) > 1:
                    yield "reduce", name, "any", launches[1].specialize()


def variants(targets: list[str]) -> list[tuple[Variant, Specialization]]:
    """Every distinct binary per target, with the shapes that launch it."""
    found: dict[tuple[str, str], tuple[Variant, Specialization]] = {}

    def add(target: str, spec: Specialization, dtype: str, **shapes) -> None:
        key = (target, spec.key())
        if key not in found:
            found[key] = (Variant(spec.kernel.__name__.strip("_"), dtype, target,
                                  dict(spec.constexprs), dict(spec.options)), spec)
        for attr, x in shapes.items():
            values = getattr(found[key][0], attr)
            if x not in values:
                values.append(x)
    for target in targets:
        for kind, dtype, head_dim, block_size, group, spec in _plans(target):
            add(target, spec, dtype, kinds=kind, head_dims=head_dim, groups=group,
                block_sizes=block_size)
        for kind, dtype, fmt, spec in _linear_plans(target):
            add(target, spec, dtype, kinds=kind, formats=fmt)
    return list(found.values())


def _cache_path(spec: Specialization, target: str) -> Path:
    text = f"{spec.kernel.cache_key}|{triton.__version__}|{spec.key()}|{target}"
    return CACHE_DIR / "compiled" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def _compile(job: tuple) -> dict:
    """In a worker: compile one specialization for one target; ptxas' numbers from its log."""
    module, name, signature, constexprs, attrs, options, target = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", TARGETS[target][0], 32),
                                      options=options)
    except Exception as err:                     # noqa: BLE001 (reported per variant)
        return {"error": f"{type(err).__name__}: {str(err)[:2000]}",
                "compile_s": time.perf_counter() - start}
    text = log.getvalue()
    used, spill = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text)
    if used is None or spill is None:
        return {"error": f"no ptxas statistics in its log:\n{text[:2000]}",
                "compile_s": time.perf_counter() - start}
    stack, stores, loads = (int(x) for x in spill.groups())
    return {"registers": int(used.group(1)), "stack_bytes": stack, "spill_stores": stores,
            "spill_loads": loads, "shared_bytes": compiled.metadata.shared,
            "compile_s": time.perf_counter() - start}


def _worker_init(triton_cache: str) -> None:
    # A private Triton cache: a hit there would skip ptxas and with it the statistics.
    os.environ["TRITON_CACHE_DIR"] = triton_cache


def compile_all(targets: list[str], workers: int = 2) -> list[Variant]:
    """Compile every variant for every target (cached results reused); sets each one's numbers."""
    found = variants(targets)
    todo = []
    for v, spec in found:
        path = _cache_path(spec, v.target)
        if path.exists():
            v.__dict__.update(json.loads(path.read_text()), cached=True)
        else:
            job = (spec.kernel.fn.__module__, spec.kernel.__name__, spec.signature,
                   spec.constexprs, spec.attrs, spec.options, v.target)
            todo.append((v, path, job))
    # The largest tiles first, so the pool does not end waiting on one slow compile.
    todo.sort(key=lambda t: -t[0].constexprs.get("ROWS", 0) * t[0].constexprs.get("DIM_P", 0))
    if todo:
        with tempfile.TemporaryDirectory() as tmp, \
                ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(tmp,)) as pool:
            for (v, path, _), result in zip(todo, pool.map(_compile, [t[2] for t in todo])):
                v.__dict__.update(result)
                if v.error is None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(result))
    return [v for v, _ in found]


def problems(results: list[Variant]) -> list[str]:
    """What fails the check: compile errors, shared memory over the target's limit, spills
    in fp16/bf16/fp8-cache attention for the padded head sizes of 64 and 128, and any spill
    in the linear kernels."""
    out = []
    for v in results:
        name = (f"{v.kernel} {'+'.join(v.kinds)} {v.dtype} {'+'.join(v.formats)} "
                f"DIM_P={v.constexprs.get('DIM_P')} {v.target}")
        if v.error:
            out.append(f"{name}: {v.error}")
            continue
        if v.shared_bytes > v.shared_limit:
            out.append(f"{name}: {v.shared_bytes} B shared > {v.shared_limit}")
        if (v.kernel == "attention_kernel" and v.dtype != "fp32"
                and v.constexprs["DIM_P"] in (64, 128) and v.spill_stores):
            out.append(f"{name}: {v.spill_stores} B spill stores ({v.registers} registers)")
        if v.kernel in LINEAR_KERNELS and (v.spill_stores or v.spill_loads):
            out.append(f"{name}: {v.spill_stores} B spill stores, {v.spill_loads} B spill "
                       f"loads ({v.registers} registers)")
    return out


def _spans(values: list[int]) -> str:
    """16,32,48,64 -> 16-64; runs of a constant step written as ranges."""
    values = sorted(values)
    if len(values) > 2 and len({b - a for a, b in zip(values, values[1:])}) == 1:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def table(results: list[Variant]) -> str:
    """The markdown table of docs/kernels.md (no timings: the same on every machine)."""
    lines = ["| kernel | kind | dtype | head sizes | GQA groups | block sizes | constexprs | "
             "warps | target | registers | spill stores | stack B | shared B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"prefill": 0, "decode": 1, "decode-split": 2, "merge": 3, "store": 4}
    for v in sorted(results, key=lambda v: (order[v.kinds[0]], v.dtype, v.constexprs["DIM_P"],
                                            v.target)):
        consts = " ".join(f"{k}={int(c) if isinstance(c, bool) else c}"
                          for k, c in v.constexprs.items())
        groups = _spans(v.groups) if v.kinds != ["store"] else "any"
        numbers = ([v.registers, v.spill_stores, v.stack_bytes, v.shared_bytes]
                   if v.error is None else ["error"] * 4)
        cells = [v.kernel.removesuffix("_kernel"), ", ".join(v.kinds), v.dtype,
                 _spans(v.head_dims), groups, _spans(v.block_sizes), consts,
                 v.options.get("num_warps"), v.target, *numbers]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def linear_table(results: list[Variant]) -> str:
    """The markdown table of the weight-only linear kernels' variants."""
    lines = ["| kernel | kind | dtype | formats | constexprs | warps | target | registers | "
             "spill stores | spill loads | stack B | shared B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {kind: i for i, kind in enumerate([*LINEAR_ROWS, "reduce"])}
    for v in sorted(results, key=lambda v: (order[v.kinds[0]], v.dtype, v.formats, v.target)):
        consts = " ".join(f"{k}={int(c) if isinstance(c, bool) else c}"
                          for k, c in v.constexprs.items() if k != "DOT_FP32")
        numbers = ([v.registers, v.spill_stores, v.spill_loads, v.stack_bytes, v.shared_bytes]
                   if v.error is None else ["error"] * 5)
        cells = [v.kernel.removesuffix("_kernel"), ", ".join(v.kinds), v.dtype,
                 ", ".join(v.formats), consts, v.options.get("num_warps"), v.target, *numbers]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


LINEAR_DOC = """
## Weight-only linear layers (`kernels/triton_linear.py`)

Quantized weights (`kernels.Lanes`: int8 / int4 at load, GGUF Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q5_K, Q6_K) are multiplied on CUDA by one kernel that decodes the lanes inside the GEMM:
{formats} lanes (8 bits one a byte, 4 bits two a byte; an fp32 scale, and a min where the
format has one, per group), activations fp16/bf16/fp32, fp32 accumulation. `plan_linear` picks
the tile from the row count: `gemv` for one row (a broadcast product summed over `BLOCK_K`
inputs), `gemm-decode` for 2-16 rows (`tl.dot` on 16 rows), `gemm-prefill` above (`tl.dot` on
64x64 output tiles; 32x32 in fp32, whose `ieee` dot runs on the FMA units). When the output
tiles cannot fill the device the inputs are split across programs and `reduce` adds the fp32
partial sums in a fixed order with the bias. Group size ({groups} enumerated), matrix sizes,
the split and the bias are runtime values and share binaries. Every variant must compile with
no spill stores or loads.

Bytes read per weight, scales included: 8-bit groups of 32 (int8, Q8_0, Q5_0) 1.125, Q6_K's
groups of 16 1.25, 4-bit with mins per 32 (int4, Q4_0, Q4_1, Q4_K) 0.75, int4 per 128 0.5625
(the files hold Q8_0 1.0625, Q6_K 0.82, Q4_1 0.625, Q4_K 0.5625). Scales stay fp32 because
the kernel computes on exactly the dequantized weights: Q6_K's and the K-quants' scale is an
fp16 times a 6- or 8-bit integer (up to 18 significant bits); on random blocks only 12% of
Q6_K's and 21% of Q4_K's scales survive a round trip through fp16, so fp16 scales (10% fewer
bytes on Q6_K) would change the weights. Q8_0's, Q4_0's and Q4_1's are fp16 in the file, so an
fp16 scale layout for them would be exact (0.0625 B a weight less), not built.

"""


DOC_HEAD = """# Triton kernels: every compiled variant

Generated by `python -m kernels.triton_variants --markdown docs/kernels.md` (triton {version},
ptxas from the triton wheel, no GPU needed); `tests/kernels/test_compile.py` compiles the same
variants in CI and fails when this table is stale, on a compile error, on shared memory over the
target's per-block limit (sm_90 232448 B, sm_80 166912 B), or on register spills in fp16/bf16
and fp8-cache attention for head sizes padded to 64 or 128.

Variants come from the launch planners (`plan_attention`, `plan_store_kv`) applied to every
engine shape: cache dtypes fp16/bf16/fp32 (the model's) and fp8 e4m3 under fp16 or bf16 queries
(`fp8/fp16`, `fp8/bf16`: the cache passed as bytes, widened to the query's dtype), head sizes {head_dims} (multiples of 16; others are
refused by the Triton path), block sizes {block_sizes}, GQA groups {groups}, and batches of three
kinds (prefill chunk beside decode rows, a full decode batch, a small decode batch over a long
context that splits the KV across programs and merges them). Group size, block size and the
lengths are runtime arguments, so they share binaries; the head size is runtime too and only its
power-of-two padding `DIM_P` is compiled in. `ROWS` is query tokens x padded group heads per
program, `BLOCK_N` the K/V positions per loop step. Registers are per thread; "spill stores" are
ptxas' bytes of spill stores, "stack" its stack frame.

"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, help="write every variant and its numbers here")
    p.add_argument("--markdown", type=Path, help="write the docs page here")
    p.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    if args.list:
        for v, _ in variants(args.targets):
            print(v.target, v.kernel, "+".join(v.kinds), v.dtype, v.constexprs, v.options)
        return 0
    start = time.perf_counter()
    results = compile_all(args.targets, args.workers)
    cached = sum(v.cached for v in results)
    print(f"{len(results)} variants ({cached} cached) in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(v) for v in results], indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(DOC_HEAD.format(
            version=triton.__version__, head_dims=_spans(list(HEAD_DIMS)),
            block_sizes=", ".join(map(str, BLOCK_SIZES)), groups=_spans(list(GROUPS)))
            + table([v for v in results if v.kernel not in LINEAR_KERNELS])
            + LINEAR_DOC.format(formats=", ".join(LINEAR_FORMATS),
                                groups=", ".join(map(str, LINEAR_GROUPS)))
            + linear_table([v for v in results if v.kernel in LINEAR_KERNELS]))
    found = problems(results)
    for line in found:
        print("FAIL", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
