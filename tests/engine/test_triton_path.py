"""The engine with the Triton kernels forced (interpreter on CPU) matches the reference path."""
import pytest

import kernels
from engine import LLMEngine, SamplingParams


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
