"""Decode speed against llama.cpp on the same model and CPU, one compute thread each side.

Prints, in one run:
1. In-process decode: our engine (``bench/engine_decode.py``) against ``llama-batched-bench``
   at each ``--batches`` size: ``--prompt-len`` token prompts, decode throughput over
   ``--gen-len`` tokens, prefill throughput beside it, and the ratios.
2. The batch-1 floor: weight bytes read per decoded token over the single-thread memory read
   bandwidth (our streaming kernel, the fastest read found here, probed between the batch-1
   run's decode steps), against our batch-1 TPOT.
3. Served: TorchServe ``llm`` (NDJSON streaming) against ``llama-server`` (its streaming
   ``/completion`` route) on the same seeded workload (mixed prompt and output lengths, greedy,
   ignore_eos), ``--streams`` clients in a closed loop each: tok/s, TTFT, TPOT, end-to-end
   latency (mean/p50/p99) and the ratios.
llama.cpp is built from the PyPI sdist and SmolLM2 written as an F32 GGUF on first use
(``bench/llama_cpp.py``): both sides run those dense weights. ``--gguf q4_1 | q8_0 | q4_k_m |
f32`` runs both on the same GGUF file instead (ours serves it in its stored types): the Q4_1
file the wheel ships, or one llama-quantize makes from the F32 file. 4. (with ``--gguf``) the
resident memory a process grows by loading the file into our engine (a small KV cache),
against the file's size. ``--json`` writes every number.

    python bench/decode.py --threads 1 --json bench_results/decode.json
    python bench/decode.py --gguf q4_1 --threads 1 --json bench_results/decode-q4_1.json
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` and `scripts.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from bench import llama_cpp
from bench.client import drive_streams, send
from bench.engine_decode import run_engine
from bench.metrics import SystemResult, machine, write_report
from bench.models import ROOT, add_model_arg, resolve
from bench.workload import Request, make_workload
from engine.config import DTYPES, KV_CACHE_DTYPES


def stream_probe(total_bytes: int = 256 << 20, repeats: int = 3) -> Callable[[], float] | None:
    """A single-thread read-bandwidth probe, GB/s: the best of ``repeats`` passes of our
    compiled linear kernel with one row over one packed weight of ``total_bytes`` (huge pages,
    four sequential streams at once: the fastest read found on this machine, see
    docs/benchmarks.md). None where the compiled kernels do not apply."""
    import kernels
    packed = kernels.pack_linear(torch.rand(total_bytes // (4 * 1024), 1024))
    if packed is None:
        return None
    x = torch.rand(1, 1024)

    def probe() -> float:
        caller = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return packed.nbytes / _best(
                lambda: kernels.linear_packed(x, packed, None), repeats) / 1e9
        finally:
            torch.set_num_threads(caller)
    return probe


def torch_sum_gbs(total_bytes: int = 512 << 20, repeats: int = 3) -> float:
    """Single-thread read bandwidth of torch's ``sum`` over 128 MiB matrices (4 KiB pages),
    the best of ``repeats`` passes: a reference the stream probe should beat."""
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunks = [torch.rand(4096, 8192) for _ in range(total_bytes // (4096 * 8192 * 4))]
        nbytes = sum(c.numel() * 4 for c in chunks)
        return nbytes / _best(lambda: [c.sum() for c in chunks], repeats) / 1e9
    finally:
        torch.set_num_threads(caller)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def weight_bytes_per_token(model_path: Path, dtype: str = "float32") -> int:
    """Bytes of every weight a decode step reads, in the format it is served in (a tied
    embedding once, as the lm_head; an untied table's few looked-up rows not at all)."""
    from engine.models import load_model
    model = load_model(str(model_path), getattr(torch, dtype), "cpu", 2)
    model.pack()
    total = 0
    for name, module in model.named_modules():
        packed = getattr(module, "packed", None)
        if packed is not None:
            total += packed.nbytes
        elif not name.endswith("embed_tokens"):
            total += sum(p.numel() * p.element_size()
                         for p in module.parameters(recurse=False) if p is not None)
    return total


def floor(weight_bytes: int, b1: dict | None, sum_gbs: float) -> dict:
    """Batch-1 TPOT against the floor: weight bytes per token over the read bandwidth the
    stream probe measured during the batch-1 run (interleaved with its decode steps, outside
    their timing: this machine's speed drifts 10-20% within minutes). The floor takes the
    median probe; the ratio against the fastest probe is printed beside it."""
    probes = (b1 or {}).get("probe_gbs") or [sum_gbs]
    bw, fastest = statistics.median(probes), max(probes)
    floor_ms = weight_bytes / bw / 1e6
    out = dict(probe_gbs=probes, torch_sum_gbs=sum_gbs, read_gbs=bw, weight_bytes=weight_bytes,
               floor_ms=floor_ms, tpot_ms=b1 and b1["tpot_ms"],
               tpot_over_floor=b1 and b1["tpot_ms"] / floor_ms,
               tpot_over_fastest=b1 and b1["tpot_ms"] * fastest * 1e6 / weight_bytes)
    print(f"\nBatch-1 floor: {weight_bytes / 1e6:.0f} MB of weights per token / {bw:.1f} GB/s "
          f"(median of {len(probes)} stream probes during the batch-1 run, "
          f"{min(probes):.1f}-{fastest:.1f}; torch sum {sum_gbs:.1f}) = {floor_ms:.1f} ms" + (
              f"; our TPOT {b1['tpot_ms']:.1f} ms = {out['tpot_over_floor']:.2f}x the floor "
              f"({out['tpot_over_fastest']:.2f}x against the fastest probe)" if b1 else ""))
    return out


def gguf_file(kind: str, bin_dir: Path | None) -> Path:
    """The SmolLM2 GGUF file of ``kind`` (q4_1 as shipped; the others made here)."""
    if kind == "q4_1":
        from scripts.make_smollm2 import smollm2_gguf
        return smollm2_gguf()
    if kind == "f32":
        return llama_cpp.f32_gguf()
    return llama_cpp.quantized_gguf(bin_dir or llama_cpp.build(), kind.upper())


_RSS_PROBE = """
import gc, sys, psutil, torch
from engine import LLMEngine
from engine.models import read_config, read_tokenizer
read_tokenizer(sys.argv[1]); read_config(sys.argv[1])      # metadata, not weights
import kernels; kernels.pack_linear(torch.zeros(16, 16))    # the compiled kernels loaded
gc.collect(); kernels.release_freed_heap()
before = psutil.Process().memory_info().rss
llm = LLMEngine(sys.argv[1], num_blocks=16)
gc.collect()
print(psutil.Process().memory_info().rss - before, llm.runner.k_cache.nbytes * 2)
"""


def load_memory(model_path: Path) -> dict:
    """RSS grown by loading ``model_path`` into a fresh engine process (16 KV blocks), the
    KV cache's share of it, and the target of the quantization issue: 1.5x the file + 64 MB."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(model_path)], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout.split()
    grown, kv = int(out[-2]), int(out[-1])
    size = model_path.stat().st_size if model_path.is_file() else sum(
        f.stat().st_size for f in model_path.glob("*.safetensors"))
    target = 1.5 * size + 64e6
    print(f"\nResident memory grown by loading {model_path.name}: {grown / 1e6:.0f} MB "
          f"(KV cache {kv / 1e6:.1f} MB) for a {size / 1e6:.0f} MB file; target <= "
          f"{target / 1e6:.0f} MB (1.5x + 64 MB): {grown / target:.2f}x of it")
    return dict(rss_grown_bytes=grown, kv_bytes=kv, file_bytes=size, target_bytes=target)


def in_process_table(ours: list[dict], peer: list[dict]) -> list[dict]:
    rows = []
    for o in ours:
        p = next((r for r in peer if int(r["B"]) == o["batch"]), None)
        rows.append(dict(batch=o["batch"], ours_tok_s=o["decode_tok_s"],
                         llama_tok_s=p and p["S_TG t/s"],
                         ratio=p and o["decode_tok_s"] / p["S_TG t/s"],
                         ours_prefill_tok_s=o["prefill_tok_s"],
                         llama_prefill_tok_s=p and p["S_PP t/s"], ours_tpot_ms=o["tpot_ms"]))
    print("\nIn-process decode, tok/s (prefill tok/s in brackets)")
    print(f"{'batch':>6}{'ours':>16}{'llama.cpp':>18}{'ratio':>8}")
    for r in rows:
        peer_cell = ("-" if r["llama_tok_s"] is None
                     else f"{r['llama_tok_s']:.1f} ({r['llama_prefill_tok_s']:.0f})")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['batch']:>6}{r['ours_tok_s']:>9.1f} ({r['ours_prefill_tok_s']:>4.0f})"
              f"{peer_cell:>18}{ratio:>8}")
    return rows


def served_workloads(streams: list[int], per_stream: int, vocab: int, prompt_mean: int,
                     output_mean: int, seed: int) -> dict[int, list[Request]]:
    """Per stream count: ``per_stream`` requests per stream (at least 4), mixed lengths."""
    return {n: make_workload(max(4, per_stream * n), vocab, 1024, seed=seed + n,
                             prompt_mean=prompt_mean, output_mean=output_mean)
            for n in streams}


def summarize(name: str, wall_s: float, records: list, workload: list[Request]) -> dict:
    failures = sum(r.error is not None or r.num_tokens != w.output_len
                   for r, w in zip(records, workload))
    res = SystemResult(name, wall_s, len(records), sum(r.num_tokens for r in records),
                       [r.num_tokens for r in records], [r.token_times_s for r in records])
    errors = [r.error for r in records if r.error][:3]
    return res.summary() | {"failures": failures, "errors": errors}


def serve_ours(model_path: Path, workloads: dict[int, list[Request]], threads: int) -> dict:
    from bench.serve import start_own
    from scripts.serve import stop_server
    (ROOT / "logs").mkdir(exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="decode-archives-", dir=ROOT / "logs"))
    server = start_own(model_path, threads, model_store=store, names=("llm",))
    try:
        url, headers = f"{server.url()}/predictions/llm", server.headers()
        warm = make_workload(2, 1000, 64, seed=1, prompt_mean=8, output_mean=4)
        drive_streams(lambda r, s: send(url, headers, r, s, True), warm, 2)
        out = {}
        for n, workload in workloads.items():
            wall, recs = drive_streams(lambda r, s: send(url, headers, r, s, True), workload, n,
                                       desc=f"llm x{n}")
            out[n] = summarize("llm", wall, recs, workload)
            print(f"TorchServe llm, {n} streams: {out[n]['tok_s']:.1f} tok/s, "
                  f"{out[n]['failures']} failures {out[n]['errors'] or ''}", flush=True)
        return out
    finally:
        stop_server(server.run_dir)


def serve_llama(bin_dir: Path, gguf: Path, workloads: dict[int, list[Request]],
                threads: int) -> dict:
    from scripts.serve import free_ports
    port = free_ports()["inference"]
    log = ROOT / "logs" / "llama-server.log"
    with llama_cpp.LlamaServer(bin_dir, gguf, port, max(workloads), 1024, threads, log) as srv:
        warm = make_workload(2, 1000, 64, seed=1, prompt_mean=8, output_mean=4)
        drive_streams(lambda r, s: llama_cpp.send(srv.url, r, s), warm, 2)
        out = {}
        for n, workload in workloads.items():
            wall, recs = drive_streams(lambda r, s: llama_cpp.send(srv.url, r, s), workload, n,
                                       desc=f"llama-server x{n}")
            out[n] = summarize("llama-server", wall, recs, workload)
            print(f"llama-server, {n} streams: {out[n]['tok_s']:.1f} tok/s, "
                  f"{out[n]['failures']} failures {out[n]['errors'] or ''}", flush=True)
        return out | {"command": " ".join(srv.cmd)}


def served_table(ours: dict, peer: dict) -> list[dict]:
    rows = []
    print("\nServed, closed loop (ours / llama-server; latencies in ms)")
    print(f"{'streams':>7}{'tok/s':>18}{'ratio':>7}{'TTFT p50':>16}{'TTFT p99':>16}"
          f"{'TPOT mean':>14}{'TPOT p99':>14}{'e2e p99':>18}")
    for n in ours:
        o, p = ours[n], peer.get(n)
        row = dict(streams=n, ours=o, llama=p, ratio=p and o["tok_s"] / p["tok_s"])
        rows.append(row)

        def pair(key: str, q: str) -> str:
            a = (o.get(key) or {}).get(q)
            b = p and (p.get(key) or {}).get(q)
            return "-" if a is None else f"{a:.0f}/" + ("-" if b is None else f"{b:.0f}")
        tok = f"{o['tok_s']:.1f}/" + ("-" if p is None else f"{p['tok_s']:.1f}")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"{n:>7}{tok:>18}{ratio:>7}{pair('ttft_ms', 'p50'):>16}{pair('ttft_ms', 'p99'):>16}"
              f"{pair('tpot_ms', 'mean'):>14}{pair('tpot_ms', 'p99'):>14}"
              f"{pair('e2e_ms', 'p99'):>18}")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(p)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--streams", default="1,8,64")
    p.add_argument("--prompt-mean", type=int, default=128, help="served workload")
    p.add_argument("--output-mean", type=int, default=64, help="served workload")
    p.add_argument("--requests-per-stream", type=int, default=2, help="served workload")
    p.add_argument("--threads", type=int, default=1, help="compute threads, each side")
    p.add_argument("--serve-threads", type=int,
                   help="our served worker's compute threads (default: --threads; 0: the "
                        "handler's own choice, as the README's server)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="our kernels backend (auto, reference)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="our weights' dtype (a Hugging Face checkpoint)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--no-llama", action="store_true", help="our side only (no llama.cpp)")
    p.add_argument("--no-serve", action="store_true", help="skip the served comparison")
    p.add_argument("--profile-dir", type=Path, help="torch.profiler tables of decode steps")
    p.add_argument("--gguf", choices=["q4_1", "q8_0", "q4_k_m", "q5_0", "q5_k_m", "q6_k", "f32"],
                   help="both sides on this SmolLM2 GGUF file (ours serves it as stored)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bin_dir = None if args.no_llama else llama_cpp.build()
    model_path = gguf_file(args.gguf, bin_dir) if args.gguf else resolve(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    report: dict = dict(config={k: str(v) if isinstance(v, Path) else v
                                for k, v in vars(args).items()},
                        model=str(model_path), machine=machine())
    print(f"{report['machine']}")
    gguf = None if bin_dir is None else (model_path if args.gguf else llama_cpp.f32_gguf())
    if args.gguf:
        report["memory"] = load_memory(model_path)
    sum_gbs, probe = torch_sum_gbs(), stream_probe()
    ours = run_engine(model_path, batches, args.prompt_len, args.gen_len, args.threads,
                      args.backend, args.seed, args.profile_dir, probe, args.dtype,
                      args.kv_cache_dtype)
    del probe       # its 256 MiB
    peer, report["llama_batched_bench_command"] = [], None
    if bin_dir is not None:
        peer, report["llama_batched_bench_command"] = llama_cpp.batched_bench(
            bin_dir, gguf, batches, args.prompt_len, args.gen_len, args.threads)
    report["in_process"] = in_process_table(ours, peer)
    report["engine_rows"], report["llama_rows"] = ours, peer
    b1 = next((o for o in ours if o["batch"] == 1), None)
    report["floor"] = floor(weight_bytes_per_token(model_path, args.dtype), b1, sum_gbs)

    if not args.no_serve:
        from engine.models import read_config
        vocab = read_config(model_path).vocab_size
        workloads = served_workloads(streams, args.requests_per_stream, vocab,
                                     args.prompt_mean, args.output_mean, args.seed)
        served_ours = serve_ours(model_path, workloads, args.threads if args.serve_threads is None
                                 else args.serve_threads)
        served_peer = {} if bin_dir is None else serve_llama(bin_dir, gguf, workloads,
                                                             args.threads)
        report["llama_server_command"] = served_peer.pop("command", None)
        report["served"] = served_table(served_ours, served_peer)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
