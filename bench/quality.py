"""Perplexity of quantized weights on a real model, against the dense model and transformers.

The quantization issue's quality targets, measured on one fixed English text (the history of
Python at the top of the standard library's LICENSE.txt, present in every Python install):

- int8 / int4 at load (``quantization``, ``--groups``: 32 and 64 by default, as 128 does not divide
  SmolLM2's 576 inputs) against our dense fp32 engine
  on the same checkpoint: int8 within 1%, int4 within 5%;
- each GGUF file served as stored against transformers on the same file, dequantized by its
  GGUF reader: within 1%;
- the dense engine against transformers fp32 (should be ~1e-6).

Perplexity is ``exp(-mean log p)`` over the text's tokens after the first, from the engine's
``prompt_logprobs`` in one prefill (chunked by the engine's token budget). With ``--speed``
each engine also decodes at batch 1 and 8 (bench/engine_decode.py), in the same run, so "faster
than dense" is read off the same table.

    python bench/quality.py [--model smollm2] [--gguf q4_1,q8_0,q4_k_m] [--tokens 1024] [--speed]
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` and `scripts.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import math
import sysconfig

import torch

from bench.metrics import machine, write_report
from bench.models import add_model_arg, resolve
from engine import LLMEngine, SamplingParams
from engine.models import read_tokenizer



def text_tokens(model_path: Path, count: int) -> list[int]:
    """The first ``count`` tokens of the fixed text under the model's tokenizer."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    ids = read_tokenizer(model_path).encode(text)
    if len(ids) < count:
        raise SystemExit(f"the text has only {len(ids)} tokens; ask for fewer")
    return ids[:count]


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def ours(model_path: Path, tokens: list[int], threads: int, **engine_args) -> list[float]:
    """Our engine's logprob of each text token after the first."""
    llm = LLMEngine(model_path, num_threads=threads, max_model_len=len(tokens) + 8,
                    dtype="float32", device="cpu", **engine_args)
    out = llm.generate([tokens], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [p.token.logprob for p in out.prompt_logprobs[1:]]


def transformers_logprobs(model_path: Path, tokens: list[int]) -> list[float]:
    """transformers fp32 on the same checkpoint (a GGUF file dequantized by its reader)."""
    from transformers import AutoModelForCausalLM
    if model_path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                  dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.inference_mode():
        logits = hf(torch.tensor([tokens])).logits[0, :-1].float()
    chosen = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens[1:])[:, None])
    return chosen[:, 0].tolist()


def speed(model_path: Path, threads: int, **engine_args) -> dict:
    """Decode tok/s at batch 1 and 8 (128-token prompts, 32 steps) of one engine."""
    from bench.engine_decode import run_batch
    llm = LLMEngine(model_path, num_threads=threads, block_size=16, num_blocks=8 * 11 + 8,
                    max_num_seqs=8, max_num_batched_tokens=1024, enable_prefix_caching=False,
                    dtype="float32", device="cpu", **engine_args)
    llm.generate([[5] * 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    return {f"b{b}_tok_s": run_batch(llm, b, 128, 33, seed=0)["decode_tok_s"] for b in (1, 8)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(p)
    p.add_argument("--gguf", default="q4_1,q8_0,q4_k_m",
                   help="SmolLM2 GGUF files to score (comma list; empty for none)")
    p.add_argument("--groups", default="32,64", help="quantization group sizes at load")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the fixed text")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed", action="store_true", help="also decode tok/s per engine")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_path = resolve(args.model)
    tokens = text_tokens(model_path, args.tokens)
    print(machine())
    dense = ours(model_path, tokens, args.threads)
    rows = [dict(system="ours dense fp32", against="transformers fp32",
                 ppl=perplexity(dense),
                 base_ppl=perplexity(transformers_logprobs(model_path, tokens)),
                 max_abs_logprob_diff=None)]
    if args.speed:
        rows[0] |= speed(model_path, args.threads)
    for name, group in ((n, int(g)) for n in ("int8", "int4") for g in args.groups.split(",")):
        knobs = dict(quantization=name, quantization_group_size=group)
        got = ours(model_path, tokens, args.threads, **knobs)
        rows.append(dict(system=f"ours {name} g{group}", against="ours dense fp32",
                         ppl=perplexity(got), base_ppl=perplexity(dense)) | (
                             speed(model_path, args.threads, **knobs) if args.speed else {}))
    if args.gguf:
        from bench.decode import gguf_file
        for kind in args.gguf.split(","):
            path = gguf_file(kind, None)
            got = ours(path, text_tokens(path, args.tokens), args.threads)
            want = transformers_logprobs(path, text_tokens(path, args.tokens))
            rows.append(dict(system=f"ours GGUF {kind}", against="transformers, same file",
                             ppl=perplexity(got), base_ppl=perplexity(want),
                             max_abs_logprob_diff=max(abs(a - b) for a, b in zip(got, want))) | (
                                 speed(path, args.threads) if args.speed else {}))
    print(f"\nPerplexity over {len(tokens)} tokens of Python's LICENSE.txt history "
          f"({model_path.name}):")
    print(f"{'system':24} {'against':26} {'ppl':>8} {'base':>8} {'ratio':>8}"
          + ("  b1 tok/s  b8 tok/s" if args.speed else ""))
    for r in rows:
        r["ratio"] = r["ppl"] / r["base_ppl"]
        print(f"{r['system']:24} {r['against']:26} {r['ppl']:8.3f} {r['base_ppl']:8.3f} "
              f"{r['ratio']:8.4f}" + (f"  {r['b1_tok_s']:8.1f}  {r['b8_tok_s']:8.1f}"
                                      if args.speed else ""))
    report = dict(config=vars(args) | dict(json=str(args.json)), machine=machine(),
                  tokens=len(tokens), rows=rows)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
