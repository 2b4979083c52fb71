"""Model loading: llama3 rope scaling and sharded safetensors match transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams
from engine.models.rope import inverse_frequencies


@pytest.fixture(scope="module", params=[dict(rope_scaling="llama3"), dict(shards=3)],
                ids=["llama3-rope", "sharded"])
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
        inverse_frequencies(64, 10000.0, {"rope_type": "yarn"})
