"""The engine with the Triton kernels forced (interpreter on CPU) matches the reference path;
quantized weights (int4 at load, a GGUF file) run through the Triton weight-only GEMM and score
as transformers does on the same dequantized weights."""
import pytest
import torch
from gguf_files import write_gguf
from transformers import AutoModelForCausalLM

import kernels
from engine import LLMEngine, SamplingParams
from engine.models.decoder import Linear
from kernels.triton_linear import TritonLanes


@pytest.fixture
def restore_backend():
    yield
    kernels.set_backend("auto")


def test_triton_path_matches_reference_token_for_token(tiny_llama, restore_backend):
    prompts = ["a short prompt", [5, 9, 13] * 12, "x"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    args = dict(num_blocks=32, max_num_batched_tokens=32, max_num_seqs=4)
    reference = LLMEngine(tiny_llama, attention_backend="reference", **args)
    expected = [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    triton = LLMEngine(tiny_llama, attention_backend="triton", **args)
    assert kernels.get_backend() == "triton"
    got = [o.token_ids for o in triton.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert triton.stats().num_chunked_prefills > 0, "the 36-token prompt spans two steps"


def _prompt_logprobs(llm: LLMEngine, prompt: list[int]) -> torch.Tensor:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert llm.allocator.num_free == llm.allocator.num_blocks
    return torch.tensor([p.token.logprob for p in out.prompt_logprobs[1:]])


def _hf_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    return logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]


PROMPT = [11, 400, 7, 93, 250, 18, 600, 42, 3, 77, 512, 9, 130, 64, 901, 33, 5, 700, 2, 88]


def test_int4_at_load_through_triton_scores_as_transformers(tiny_llama, restore_backend):
    """Every linear reads int4 lanes in the Triton GEMM (the head int8 lanes); transformers
    computes on the same weights dequantized; both in fp32."""
    llm = LLMEngine(tiny_llama, num_blocks=16, quantization="int4", quantization_group_size=32,
                    attention_backend="triton")
    model = llm.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.packed, TritonLanes) for m in linears)
    assert model.model.compiled is None
    got = _prompt_logprobs(llm, PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear):
                bits = 8 if name == "lm_head" else 4
                module.weight.copy_(kernels.quantize(module.weight, bits, 32).dequantize())
    torch.testing.assert_close(got, _hf_logprobs(hf, PROMPT), atol=2e-4, rtol=0)


def test_gguf_file_through_triton_scores_as_transformers(tiny_llama, tmp_path,
                                                         restore_backend):
    """A file mixing 8- and 4-bit block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) served on the
    Triton path, its token embedding looked up in its quantized table, against transformers
    reading the same file."""
    types = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
    path = write_gguf(tmp_path / "mixed.gguf", tiny_llama,
                      lambda name: types[sum(map(ord, name)) % len(types)])
    llm = LLMEngine(path, num_blocks=16, attention_backend="triton")
    decoder = llm.runner.model.model
    assert isinstance(decoder.embed_table, TritonLanes) and decoder.embed_tokens.weight is None
    got = _prompt_logprobs(llm, PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    torch.testing.assert_close(got, _hf_logprobs(hf, PROMPT), atol=2e-4, rtol=0)
