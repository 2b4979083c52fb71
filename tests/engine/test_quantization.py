"""Weight-only quantization at load (``quantization: int8 | int4``): the engine scores a prompt
as transformers does on the same quantized weights (``kernels.quantize`` then dequantized) for
Llama, Qwen2 and Qwen3, int8 stays close to the dense model and int4 within its coarser bound;
wrong settings are refused with a message."""
import math
import random

import pytest
import torch
from gguf_files import write_gguf
from transformers import AutoModelForCausalLM

import kernels
from engine import LLMEngine, SamplingParams

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def prompt(tiny_llama) -> list[int]:
    rng = random.Random(21)
    return [rng.randrange(7, 1024) for _ in range(120)]


def _score(llm: LLMEngine, prompt: list[int]) -> tuple[list[float], list[int]]:
    """The engine's logprob of each prompt token after the first, and its top token there."""
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert llm.allocator.num_free == llm.allocator.num_blocks
    return ([p.token.logprob for p in out.prompt_logprobs[1:]],
            [p.top[0].token_id for p in out.prompt_logprobs[1:]])


def _hf_score(path, bits: int, group: int, prompt: list[int]) -> tuple[list[float], list[int]]:
    """The same from transformers on the checkpoint, its linear weights quantized as the
    engine quantizes them (lm_head, and the embedding tied to it, at 8 bits at least), then
    dequantized."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.endswith(PROJECTIONS) or name == "lm_head":
                width = max(bits, 8) if name == "lm_head" else bits
                module.weight.copy_(kernels.quantize(module.weight, width, group).dequantize())
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    chosen = logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    return chosen.tolist(), logprobs.argmax(-1).tolist()


def _ppl(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def _agree(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@pytest.mark.parametrize("name,bits,group", [("int8", 8, 32), ("int4", 4, 32), ("int8", 8, 64),
                                             ("int4", 4, 16)])
def test_matches_transformers_on_the_quantized_weights(tiny_llama, prompt, name: str,
                                                       bits: int, group: int) -> None:
    llm = LLMEngine(tiny_llama, num_blocks=32, quantization=name,
                    quantization_group_size=group)
    got, top1 = _score(llm, prompt)
    want, want_top1 = _hf_score(tiny_llama, bits, group, prompt)
    # only the activations' two-pass int8 rounding (~15 bits) separates the two
    assert max(abs(g - w) for g, w in zip(got, want)) < 3e-3
    assert abs(_ppl(got) / _ppl(want) - 1) < 1e-3
    assert _agree(top1, want_top1) >= 0.97


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4)])
def test_each_architecture_matches_transformers(tiny_model, prompt, name: str,
                                                bits: int) -> None:
    """Qwen2's biases and Qwen3's q/k norms and head size stay as they are around the
    quantized projections."""
    got, top1 = _score(LLMEngine(tiny_model, num_blocks=32, quantization=name), prompt)
    want, want_top1 = _hf_score(tiny_model, bits, 32, prompt)
    assert max(abs(g - w) for g, w in zip(got, want)) < 3e-3
    assert abs(_ppl(got) / _ppl(want) - 1) < 1e-3
    assert _agree(top1, want_top1) >= 0.97


def test_int8_close_to_dense_int4_within_its_bound(tiny_llama, prompt) -> None:
    dense, dense_top1 = _score(LLMEngine(tiny_llama, num_blocks=32), prompt)
    agree, ppl = {}, {}
    for name in ("int8", "int4"):
        llm = LLMEngine(tiny_llama, num_blocks=32, quantization=name, quantization_group_size=32)
        got, top1 = _score(llm, prompt)
        ppl[name] = _ppl(got) / _ppl(dense)
        agree[name] = _agree(top1, dense_top1)
        diffs = [abs(g - d) for g, d in zip(got, dense)]
        if name == "int8":
            assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.1
        else:       # 16 levels for weights of std 0.2: about one nat off per token
            assert sum(diffs) / len(diffs) < 1.5
    # the random tiny model has near-tied leading logits (a few hundredths apart), so int8
    # flips some of them; a wrong scale or misplaced group would flip nearly all
    assert agree["int8"] >= 0.85 and agree["int4"] >= 0.2, agree
    assert abs(ppl["int8"] - 1) < 0.02 and abs(ppl["int4"] - 1) < 0.2, ppl


@pytest.mark.parametrize("settings,message", [
    (dict(quantization="int3"), "quantization must be one of"),
    (dict(quantization="int8", quantization_group_size=30), "quantization_group_size"),
    (dict(quantization="int8", quantization_group_size=48), "quantization_group_size"),
    (dict(quantization="int4", quantization_group_size=0), "quantization_group_size"),
    (dict(quantization="int8", dtype="bfloat16"), "dtype must be float32"),
])
def test_invalid_settings_are_refused(tiny_llama, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLMEngine(tiny_llama, num_blocks=8, **settings)


def test_group_not_dividing_the_inputs_is_refused(tiny_llama) -> None:
    # hidden 64 inputs: a group of 96 cannot tile them
    with pytest.raises(ValueError, match="group size 96"):
        LLMEngine(tiny_llama, num_blocks=8, quantization="int8", quantization_group_size=96)


def test_quantizing_a_gguf_file_is_refused(tiny_llama, tmp_path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama, "F32")
    with pytest.raises(ValueError, match="GGUF file is served in its own types"):
        LLMEngine(path, num_blocks=8, quantization="int8")
