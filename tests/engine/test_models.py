"""Model loading: llama3 and yarn rope scaling and sharded safetensors match transformers;
yarn's frequencies and attention factor as transformers computes them; llama3 settings read
back from a GGUF file's frequency divisors; the compiled CPU layers match the
module-by-module path."""
import numpy as np
import pytest
import torch
from gguf_files import rope_divisors
from transformers import AutoModelForCausalLM

import kernels
from engine import LLMEngine, SamplingParams
from engine.models.rope import attention_factor, inverse_frequencies, llama3_from_divisors


@pytest.fixture(scope="module", params=[dict(rope_scaling="llama3"), dict(rope_scaling="yarn"),
                                        dict(shards=3)],
                ids=["llama3-rope", "yarn-rope", "sharded"])
def variant(request, build_tiny):
    return build_tiny("llama", **request.param)


def test_variant_matches_transformers(variant):
    hf = AutoModelForCausalLM.from_pretrained(variant, dtype=torch.float32).eval()
    prompts = [[(7 * i + 3) % hf.config.vocab_size for i in range(n)] for n in (4, 90, 400)]
    llm = LLMEngine(variant, num_blocks=128)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out.token_ids == ref[0, len(prompt):].tolist()


def test_llama3_scaling_changes_only_low_frequencies():
    plain = inverse_frequencies(64, 500000.0, None)
    scaled = inverse_frequencies(64, 500000.0, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    assert torch.equal(scaled[:4], plain[:4])
    assert torch.allclose(scaled[-1], plain[-1] / 8)
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        inverse_frequencies(64, 10000.0, {"rope_type": "longrope"})


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 16, "beta_slow": 2}, {"truncate": False},
                                   {"attention_factor": 1.3}, {"mscale": 1.0, "mscale_all_dim": 0.5}],
                         ids=["plain", "betas", "untruncated", "attention-factor", "mscales"])
@pytest.mark.parametrize("head_dim, theta, factor, original",
                         [(128, 1e6, 4.0, 32768), (16, 1e4, 8.0, 256)], ids=["qwen2.5", "tiny"])
def test_yarn_as_transformers_computes_it(head_dim, theta, factor, original, extra):
    """Frequencies and the attention factor against transformers' own yarn."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
            "original_max_position_embeddings": original, **extra}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=int(original * factor), rope_parameters=rope)
    want, gain = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert torch.allclose(inverse_frequencies(head_dim, theta, rope), want, rtol=1e-6, atol=0)
    assert attention_factor(rope) == pytest.approx(gain, rel=1e-12)
    assert attention_factor({"rope_type": "llama3"}) == 1.0


@pytest.mark.parametrize("head_dim, theta, original", [(128, 500000.0, 8192), (16, 10000.0, 256),
                                                       (8, 10000.0, 256)],
                         ids=["llama3.1", "one-blended-pair", "none-blended"])
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_settings_from_gguf_divisors(head_dim, theta, original, factor):
    """The settings read back from llama.cpp's divisors give the same frequencies, and Llama
    3.1's own settings where the file determines them."""
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    divisors = rope_divisors(rope, head_dim)
    settings = llama3_from_divisors(divisors, head_dim, theta)
    want = inverse_frequencies(head_dim, theta, rope)
    assert torch.allclose(inverse_frequencies(head_dim, theta, settings), want, rtol=1e-5, atol=0)
    if head_dim == 128:
        assert {k: settings[k] for k in rope if k != "rope_theta"} == \
            {k: v for k, v in rope.items() if k != "rope_theta"}
    assert llama3_from_divisors(np.ones(head_dim // 2), head_dim, theta) is None
    with pytest.raises(ValueError, match="not a llama3 scaling"):
        llama3_from_divisors(divisors[::-1].copy(), head_dim, theta)


def test_compiled_layers_match_the_module_path(tiny_model):
    """The CPU fp32 path (packed weights, one compiled call for all layers) against the same layers
    module by module in torch: greedy tokens equal and prompt/sample logprobs within 1e-4, in
    a batch mixing chunked prefill over a cached prefix with decode rows."""
    if not kernels._use_cpu(torch.empty(1)):
        pytest.skip("no C++ compiler for the CPU kernels")
    prefix = [(5 * i + 1) % 200 for i in range(40)]
    prompts = [prefix + [7, 8, 9], prefix + [3] * 70, [11, 12], list(range(20, 95))]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2)
    runs, before = [], kernels.get_backend()
    try:
        for backend in ("auto", "reference"):
            llm = LLMEngine(tiny_model, num_blocks=64, block_size=8, max_num_seqs=4,
                            max_num_batched_tokens=48, attention_backend=backend)
            assert (llm.runner.model.model.compiled is not None) == (backend == "auto")
            runs.append(llm.generate(prompts, params, use_tqdm=False))
    finally:
        kernels.set_backend(before)
    for ours, ref in zip(*runs):
        assert ours.token_ids == ref.token_ids
        pairs = list(zip(ours.logprobs, ref.logprobs)) + [
            (a, b) for a, b in zip(ours.prompt_logprobs, ref.prompt_logprobs) if a is not None]
        for a, b in pairs:
            assert [t.token_id for t in a.top] == [t.token_id for t in b.top]
            assert a.token.logprob == pytest.approx(b.token.logprob, abs=1e-4)
