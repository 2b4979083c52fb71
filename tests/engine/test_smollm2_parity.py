"""SmolLM2-135M-Instruct: greedy output token-identical to transformers on chat prompts run
together, under preemption (a small KV pool) and chunked prefill (a small token budget)."""
import torch
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 7?",
    "Write a haiku about the sea.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a CPU do?", "Translate 'good morning' into Spanish.",
    "List two uses of copper.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "How many legs does a spider have?", "Suggest a name for a cat.",
    "What is the boiling point of water in Celsius?", "Explain gravity in one sentence.",
    "What is the largest planet in the solar system?",
]
MAX_TOKENS = 24


def test_chat_prompts_batched_preempted_chunked(smollm2_dir):
    llm = LLMEngine(smollm2_dir, num_blocks=20, max_num_seqs=16, max_num_batched_tokens=64)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                 tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    stats = llm.stats()
    assert stats.num_preemptions > 0 and stats.num_chunked_prefills > 0
    assert llm.allocator.num_free == llm.allocator.num_blocks

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for question, prompt, out in zip(QUESTIONS, prompts, outs):
            ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=MAX_TOKENS)[0, ids.shape[1]:].tolist()
            assert out.prompt_tokens == ids.shape[1]
            assert out.token_ids == want, f"{question!r}: engine {out.text!r} != transformers"
    assert "Paris" in outs[0].text
