"""The steps of scripts/gpu_check.sh that no other script covers, one subcommand each.

- ``parity``: greedy tokens of our engine (all prompts at once: batched, chunked prefill)
  against transformers ``generate()`` one prompt at a time, on a device, per dtype (fp32 with
  an fp32 cache must be identical; others, an fp8 KV cache among them, report how far they
  agree); plus a seeded request alone and inside a busy batch (per-request generators on the
  logits' device).
- ``random-llama``: a Llama checkpoint of random weights (``1b``: Llama-3.2-1B's shape with the
  given tokenizer's vocabulary, ~1.07B parameters; ``tiny`` for the CPU dry run).
- ``serve``: one TorchServe with the ``llm`` archive of a checkpoint on a device; a streamed and
  a whole request must come back with text.
- ``linear``: the Triton weight-only GEMM (kernels/triton_linear.py) against the dequantized
  weights in float64, per format (int8, int4, GGUF Q8_0 / Q4_K / Q6_K), row count and
  activation dtype; on CUDA its time and GB/s against dense ``F.linear``, and the engine's
  decode tok/s with int8 / int4 weights against dense fp32 on a checkpoint.

Each prints one JSON line of results and exits non-zero when its check fails.

    python scripts/gpu_check.py parity --model DIR --device cuda --dtypes float32 bfloat16
    python scripts/gpu_check.py random-llama --out DIR --size 1b --tokenizer-from DIR
    python scripts/gpu_check.py serve --model DIR --device cuda --dtype bfloat16 --run-dir DIR
    python scripts/gpu_check.py linear --device cuda --model DIR
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import random
import subprocess
import tempfile
import time

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SIZES = {   # hidden, layers, heads, kv heads, intermediate
    "1b": (2048, 16, 32, 8, 8192),
    "tiny": (64, 2, 4, 2, 128),
}


def parity(args: argparse.Namespace) -> bool:
    """Greedy parity per dtype (fp32 must be identical), then the seeded check; one JSON line
    per dtype."""
    ok = True
    for dtype in args.dtypes:
        identical, total, seeded_ok = _parity(args, dtype)
        exact = dtype == "float32" and args.kv_cache_dtype in ("auto", "float32")
        ok = ok and seeded_ok and (not exact or identical == total)
    return ok


def _parity(args: argparse.Namespace, dtype: str) -> tuple[int, int, bool]:
    from transformers import AutoModelForCausalLM

    from engine import LLMEngine, SamplingParams
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype))
    hf = hf.to(args.device).eval()
    hf.generation_config.eos_token_id = None       # every continuation runs to max_tokens
    rng = random.Random(0)
    vocab = hf.config.vocab_size
    lengths = [1, 15, 16, 17, 33] + [rng.randint(2, args.max_prompt) for _ in
                                     range(args.prompts - 5)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=args.device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=args.max_tokens)
            expected.append(out[0, len(prompt):].tolist())
    del hf
    llm = LLMEngine(args.model, device=args.device, dtype=dtype, num_blocks=args.num_blocks,
                    max_num_seqs=args.prompts, max_num_batched_tokens=128,
                    kv_cache_dtype=args.kv_cache_dtype)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    agree = [_common_prefix(a, b) for a, b in zip(got, expected)]
    identical = sum(n == args.max_tokens for n in agree)

    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=16)
    alone = llm.generate([prompts[3]], seeded, use_tqdm=False)[0].token_ids
    for i, prompt in enumerate(prompts[4:10]):     # seeded and unseeded neighbours
        llm.add_request(f"other-{i}", prompt, SamplingParams(
            temperature=1.0, seed=i if i % 2 else None, max_tokens=16))
    llm.add_request("seeded", prompts[3], seeded)
    busy: list[int] = []
    while llm.has_unfinished():
        for out in llm.step():
            if out.request_id == "seeded":
                busy += out.token_ids
    print(json.dumps(dict(check="parity", model=str(args.model), device=args.device,
                          dtype=dtype, kv_cache_dtype=args.kv_cache_dtype,
                          backend=_backend(llm), prompts=len(prompts),
                          max_tokens=args.max_tokens, identical=identical,
                          agreeing_prefix=agree, seeded_alone_equals_busy=alone == busy)))
    return identical, len(prompts), alone == busy


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _backend(llm) -> str:
    import kernels
    name = kernels.get_backend()
    return name if name != "auto" else ("triton" if llm.runner.device.type == "cuda"
                                        else "reference")


def random_llama(args: argparse.Namespace) -> bool:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
    hidden, layers, heads, kv_heads, intermediate = LLAMA_SIZES[args.size]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps(dict(check="random-llama", out=str(args.out), size=args.size,
                          parameters=params, dtype=args.dtype)))
    return True


def serve(args: argparse.Namespace) -> bool:
    import requests
    import yaml

    from scripts.build_archives import archive_cmd
    from scripts.serve import free_ports, start_server, stop_server
    run_dir = Path(args.run_dir).resolve()
    store = run_dir / "archives"
    store.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((ROOT / "config" / "llm.model-config.yaml").read_text())
    config["handler"].update(model_path=str(Path(args.model).resolve()), device=args.device,
                             dtype=args.dtype)
    with tempfile.TemporaryDirectory() as stage:       # the archive points at the checkpoint
        path = Path(stage) / "llm.model-config.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(archive_cmd("llm", ROOT / "handlers" / "continuous_batching.py", path,
                                   None, store), check=True)
    start = time.monotonic()
    server = start_server(store, ("llm",), run_dir / "server", ports=free_ports(),
                          timeout_s=args.timeout)
    ready_s = time.monotonic() - start
    try:
        url = f"{server.url()}/predictions/llm"
        body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
        whole = requests.post(url, json=body, headers=server.headers(), timeout=120)
        streamed = requests.post(url, json={**body, "stream": True}, headers=server.headers(),
                                 stream=True, timeout=120)
        chunks = [json.loads(line) for line in streamed.iter_lines() if line]
        text = whole.json().get("text", "") if whole.ok else ""
        stream_text = "".join(c.get("text", "") for c in chunks)
        worker_log = (server.run_dir / "logs" / "model_log.log")
        backend_lines = [line for line in worker_log.read_text(errors="replace").splitlines()
                         if "kernels backend" in line] if worker_log.exists() else []
        result = dict(check="serve", device=args.device, dtype=args.dtype,
                      ready_s=round(ready_s, 1), status=whole.status_code, text=text,
                      stream_chunks=len(chunks), stream_equals_whole=stream_text == text,
                      backend_log=backend_lines[-1:])
    finally:
        stop_server(server.run_dir)
    print(json.dumps(result))
    return whole.ok and bool(text) and stream_text == text


# name -> (bits, group, GGUF type or None): every kind of lanes the kernel has a binary for
LINEAR_FORMATS = {"int8-g32": (8, 32, None), "int4-g32": (4, 32, None),
                  "int4-g128": (4, 128, None), "Q8_0": (8, 32, "Q8_0"),
                  "Q4_K": (4, 32, "Q4_K"), "Q6_K": (8, 16, "Q6_K")}
LINEAR_SHAPES = {"big": (4096 + 37, 2048), "tiny": (37, 512)}   # (out, in): odd out count


def _lanes(name: str, n: int, k: int):
    import kernels
    bits, group, gguf_type = LINEAR_FORMATS[name]
    if gguf_type is None:
        return kernels.quantize(torch.randn(n, k) * 0.05, bits, group)
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_files import random_blocks
    return kernels.from_gguf(gguf_type, random_blocks(gguf_type, n, k, seed=n), (n, k))


def linear(args: argparse.Namespace) -> bool:
    """Kernel error against the float64 product as a fraction of its bound (<= 1 passes: the
    weight rounded to the activations' dtype, fp32 summation order, one output rounding),
    then timings on CUDA. One JSON line each."""
    import kernels
    from kernels.triton_linear import linear_triton, pack
    kernels.set_backend("triton")
    eps = {"float32": 1e-5, "bfloat16": 2 ** -8}
    n, k = LINEAR_SHAPES[args.size]
    worst = {}
    for name in LINEAR_FORMATS:
        lanes = _lanes(name, n, k)
        packed = pack(lanes, args.device)
        w = lanes.dequantize().to(args.device, torch.float64)
        for dtype in eps:
            for m in (1, 8, 16, 64, 300):
                x = torch.randn(m, k, device=args.device).to(getattr(torch, dtype))
                y = linear_triton(x, packed, None).double()
                want = x.double() @ w.T
                bound = eps[dtype] * (x.double().abs() @ w.abs().T + want.abs()) + 1e-30
                ratio = float(((y - want).abs() / bound).max())
                worst[f"{name} {dtype}"] = max(ratio, worst.get(f"{name} {dtype}", 0.0))
    ok = all(r <= 1 for r in worst.values())
    print(json.dumps(dict(check="linear", device=args.device, shape=[n, k], ok=ok,
                          worst_error_over_bound={key: round(r, 3) for key, r in worst.items()})))
    if args.device.startswith("cuda"):
        _linear_timings(n, k, args.device)
    if args.model is not None or args.gguf is not None:
        _quantized_decode(args)
    return ok


def _linear_timings(n: int, k: int, device: str) -> None:
    """Microseconds per call and weight GB/s: the Triton kernel on int8 / int4 lanes against
    F.linear on the dense fp32 and bf16 weight (CUDA events, median of 50)."""
    import torch.nn.functional as F

    from kernels.triton_linear import linear_triton, pack

    def median_us(fn) -> float:
        fn()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return sorted(times)[len(times) // 2]
    dense = torch.randn(n, k, device=device)
    for m in (1, 8, 64, 512):
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, device=device, dtype=dtype)
            wd = dense.to(dtype)
            us = median_us(lambda: F.linear(x, wd))
            row[f"dense {str(dtype)[6:]}"] = [round(us, 1), round(wd.nbytes / us / 1e3, 1)]
            for name in ("int8-g32", "int4-g32", "Q4_K", "Q6_K"):
                packed = pack(_lanes(name, n, k), device)
                us = median_us(lambda: linear_triton(x, packed, None))
                row[f"{name} {str(dtype)[6:]}"] = [round(us, 1),
                                                   round(packed.nbytes / us / 1e3, 1)]
        print(json.dumps(dict(check="linear-time", rows=m, shape=[n, k],
                              us_and_weight_gbps=row)))


def _quantized_decode(args: argparse.Namespace) -> None:
    """Decode output tok/s of the engine (fp32 activations) on ``--model`` with dense, int8
    and int4 weights and on the ``--gguf`` file as stored, at batch 1 and 8, 16-token prompts,
    ``--max-tokens`` each; plus each one's greedy continuation of a fixed text."""
    from engine import LLMEngine, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    runs = [] if args.model is None else [(args.model, q) for q in (None, "int8", "int4")]
    runs += [] if args.gguf is None else [(args.gguf, None)]
    tok_s, texts = {}, {}
    for path, quantization in runs:
        kind = "stored" if path == args.gguf else quantization or "dense"
        label = f"{Path(path).name} {kind}"
        llm = LLMEngine(path, device=args.device, dtype="float32", num_blocks=256,
                        quantization=quantization, attention_backend="triton")
        texts[label] = llm.generate(["The capital of France is"], SamplingParams(
            temperature=0, max_tokens=8), use_tqdm=False)[0].text
        for batch in (1, 8):
            prompts = [[7 + i + j for j in range(16)] for i in range(batch)]
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tok_s[f"{label} batch {batch}"] = round(
                sum(len(o.token_ids) for o in outs) / seconds, 1)
        del llm
    print(json.dumps(dict(check="quantized-decode", device=args.device, tok_s=tok_s,
                          texts=texts)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    par = sub.add_parser("parity")
    par.add_argument("--model", type=Path, required=True)
    par.add_argument("--device", default="cuda")
    par.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    par.add_argument("--prompts", type=int, default=16)
    par.add_argument("--max-prompt", type=int, default=300)
    par.add_argument("--max-tokens", type=int, default=32)
    par.add_argument("--num-blocks", type=int, default=1024)
    par.add_argument("--kv-cache-dtype", default="auto")
    rl = sub.add_parser("random-llama")
    rl.add_argument("--out", type=Path, required=True)
    rl.add_argument("--size", choices=sorted(LLAMA_SIZES), default="1b")
    rl.add_argument("--tokenizer-from", type=Path, required=True)
    rl.add_argument("--device", default="cuda")
    rl.add_argument("--dtype", default="bfloat16")
    sv = sub.add_parser("serve")
    sv.add_argument("--model", type=Path, required=True)
    sv.add_argument("--device", default="cuda")
    sv.add_argument("--dtype", default="bfloat16")
    sv.add_argument("--run-dir", type=Path, required=True)
    sv.add_argument("--timeout", type=float, default=240)
    li = sub.add_parser("linear")
    li.add_argument("--device", default="cuda")
    li.add_argument("--size", choices=sorted(LINEAR_SHAPES), default="big")
    li.add_argument("--model", type=Path, help="also time the engine's decode on it")
    li.add_argument("--gguf", type=Path, help="and on this GGUF file as stored")
    li.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    ok = {"parity": parity, "random-llama": random_llama, "serve": serve,
          "linear": linear}[args.command](args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
