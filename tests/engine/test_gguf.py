"""GGUF files served in their stored types (engine/models/gguf_file.py), against transformers
reading the same file: F32, F16 and BF16 greedy token-identical; Q8_0, Q4_1, a file mixing five
block types across the fused q/k/v and gate/up parts, and a Q4_K_M-like file of K-quants (Q4_K,
Q5_K and Q6_K mixed in the fused parts, a Q6_K tied embedding) score prompts as transformers
does on the dequantized weights; Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k norms, a head size
the file states) files, and a Llama file named for Mistral, each both ways; rope scaling as the
file states it; unsupported, corrupt, mixed-kind and truncated files are refused with an error
naming the problem; KV blocks all come back. Plus SmolLM2's shipped Q4_1 file against
transformers' fp32 import of it."""
import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import gguf_name, random_blocks, write_gguf
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from engine import LLMEngine, SamplingParams
from engine.models import gguf_file

MIXED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _mixed(name: str) -> str:
    """A block type per tensor, cycling so q, k and v (and gate, up) differ."""
    return MIXED[sum(map(ord, name)) % len(MIXED)]


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory):
    """``files(kind)``: the tiny Llama written as a GGUF file of ``kind`` (once per kind)."""
    out = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_gguf(out / f"tiny-{kind}.gguf", tiny_llama,
                                    _mixed if kind == "mixed" else kind)
        return made[kind]
    return make


def _hf(path: Path):
    """transformers' own reading of the file (dequantized to fp32). The config is the file's
    as the engine reads it: transformers' reader leaves Qwen3's head size at its default."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                config=gguf_file.read_config(path),
                                                dtype=torch.float32).eval()


def _checkpoint(path: Path):
    """transformers on the checkpoint directory a file was written from."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, 1024) for _ in range(n)] for n in lengths]


def _greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_mixed_file_has_mixed_parts(files) -> None:
    reader = gguf.GGUFReader(str(files("mixed")))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len({kinds[f"blk.0.attn_{p}.weight"] for p in "qkv"}) > 1
    assert len({kinds[n] for n in kinds if n.endswith(".weight") and
                kinds[n] != "F32"}) == len(MIXED)


def _assert_greedy(path: Path, hf, lengths: tuple[int, ...] = (1, 17, 40, 100)) -> None:
    """Batched greedy decoding of the file equals ``hf.generate`` token for token."""
    prompts = _prompts(list(lengths), seed=1)
    llm = LLMEngine(path, num_blocks=128, max_num_seqs=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens"
    assert llm.allocator.num_free == llm.allocator.num_blocks


def _assert_scores(path: Path, hf) -> None:
    """A prompt's logprobs from the file match ``hf``'s to the activations' int8 rounding."""
    prompt = _prompts([120], seed=2)[0]
    llm = LLMEngine(path, num_blocks=32)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                prompt_logprobs=1), use_tqdm=False)[0]
    assert llm.allocator.num_free == llm.allocator.num_blocks
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], dim=-1)
    got = torch.tensor([p.token.logprob for p in out.prompt_logprobs[1:]], dtype=torch.float64)
    ref = want[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].double()
    # the weights are the same; only the activations' two-pass int8 rounding differs
    assert float((got - ref).abs().max()) < 4e-3
    assert abs(float(torch.exp(-got.mean()) / torch.exp(-ref.mean())) - 1) < 1e-3
    top1 = [p.top[0].token_id for p in out.prompt_logprobs[1:]]
    agree = sum(a == b for a, b in zip(top1, want[:-1].argmax(-1).tolist())) / len(top1)
    assert agree >= 0.97, agree         # leading logits of the random model are near-tied
    assert out.token_ids[:1] == _greedy(hf, prompt, 1)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_dense_files_greedy_token_identical(files, tiny_llama, kind: str) -> None:
    path = files(kind)
    # F32: the checkpoint itself; F16, BF16: transformers on the file's rounded weights
    hf = _checkpoint(tiny_llama) if kind == "F32" else _hf(path)
    _assert_greedy(path, hf)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "mixed"])
def test_quantized_files_score_as_transformers(files, kind: str) -> None:
    path = files(kind)
    _assert_scores(path, _hf(path))


# a Q4_K_M-like file: K-quants (blocks of 256 inputs) where the inputs allow, mixed inside the
# fused q/k/v and gate/up, the tied embedding and head Q6_K; down_proj's 1408 inputs Q5_0
_K_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
            "ffn_gate": "Q5_K", "ffn_up": "Q4_K", "token_embd": "Q6_K"}
_K_SCALES = {"Q4_K": 0.015, "Q5_K": 0.007, "Q6_K": 0.002}    # weights' spread ~0.02


def test_k_quant_file_scores_as_transformers(build_tiny, tmp_path) -> None:
    model = build_tiny("llama", size="default", train_steps=0)     # 512 wide, untrained
    raw = {}
    for i, (name, w) in enumerate(load_file(str(model / "model.safetensors")).items()):
        kind = _K_TYPES.get(gguf_name(name).split(".")[-2])
        if kind is not None and w.ndim == 2:
            raw[gguf_name(name)] = (kind, random_blocks(kind, *w.shape, seed=i,
                                                        scale=_K_SCALES[kind], centered=True))
    path = write_gguf(tmp_path / "k-mix.gguf", model, "Q5_0", raw)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"Q4_K", "Q5_K", "Q6_K", "Q5_0"} <= kinds
    _assert_scores(path, _hf(path))


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_each_architecture_as_transformers_reads_it(tiny_model, tmp_path, kind: str) -> None:
    path = write_gguf(tmp_path / f"{tiny_model.name}-{kind}.gguf", tiny_model, kind)
    arch = gguf_file.architecture(gguf.GGUFReader(str(path)))
    assert arch == json.loads((tiny_model / "config.json").read_text())["model_type"]
    config = gguf_file.read_config(path)
    assert config.architectures == [gguf_file.ARCHITECTURES[arch]]
    if arch == "qwen3":         # tiny qwen3's head size is not hidden / heads
        assert config.head_dim == 32 != config.hidden_size // config.num_attention_heads
    if kind == "F32":
        _assert_greedy(path, _checkpoint(tiny_model))
    else:
        _assert_scores(path, _hf(path))


def test_llama_file_named_for_mistral(tiny_llama, tmp_path) -> None:
    """llama.cpp writes Mistral models as ``llama`` files. transformers' config reader makes
    one whose general.name is "mistral" a Mistral config (its tensor reader then fails on it
    with gguf 0.19); the engine serves it as the Llama it is."""
    path = write_gguf(tmp_path / "mistral.gguf", tiny_llama, "F32", model_name="mistral")
    config = gguf_file.read_config(path)
    assert (config.model_type, config.architectures) == ("mistral", ["LlamaForCausalLM"])
    _assert_greedy(path, _checkpoint(tiny_llama))


def _refused(path: Path, *patterns: str) -> None:
    with pytest.raises(ValueError) as info:
        LLMEngine(path, num_blocks=8)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)


def test_llama3_rope_scaling_from_its_frequency_divisors(build_tiny, tmp_path) -> None:
    """llama.cpp keeps Llama 3's rope scaling only as rope_freqs.weight; read back into llama3
    settings, the file decodes as the checkpoint it came from at lengths where the slowed
    frequencies matter."""
    model = build_tiny("llama", rope_scaling="llama3")
    path = write_gguf(tmp_path / "llama3.gguf", model, "F32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert gguf_file.read_config(path).rope_parameters["rope_type"] == "llama3"
    _assert_greedy(path, _checkpoint(model), lengths=(4, 90, 400))


def test_linear_rope_scaling_from_the_metadata(tiny_llama, tmp_path) -> None:
    path = write_gguf(tmp_path / "linear.gguf", tiny_llama, "F32", rope_scaling=("linear", 4.0))
    config = AutoConfig.from_pretrained(tiny_llama)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 4.0}
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, config=config, dtype=torch.float32)
    _assert_greedy(path, hf.eval(), lengths=(4, 90, 400))


def test_yarn_rope_scaling_from_the_metadata(build_tiny, tmp_path) -> None:
    """Qwen's long-context setting: llama.cpp writes yarn's type, factor and original context."""
    model = build_tiny("qwen2", rope_scaling="yarn")
    path = write_gguf(tmp_path / "yarn.gguf", model, "F32")
    rope = gguf_file.read_config(path).rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == \
        ("yarn", 4.0, 256)
    _assert_greedy(path, _checkpoint(model), lengths=(4, 90, 400))


def test_rope_scaling_the_engine_does_not_serve_is_refused(tiny_llama, tmp_path) -> None:
    path = write_gguf(tmp_path / "longrope.gguf", tiny_llama, "F32",
                      rope_scaling=("longrope", 4.0))
    _refused(path, "unsupported rope_scaling type 'longrope'")
    path = write_gguf(tmp_path / "yarn.gguf", tiny_llama, "F32", rope_scaling=("yarn", 4.0))
    _refused(path, "llama.rope.scaling.original_context_length")        # yarn without it


def test_unsupported_type_names_tensor_and_type(tiny_llama, tmp_path) -> None:
    raw = np.random.default_rng(3).integers(0, 256, (64, 4 * 18), dtype=np.uint8)  # [64, 128]
    path = write_gguf(tmp_path / "iq.gguf", tiny_llama, "Q8_0",
                      {"blk.1.ffn_down.weight": ("IQ4_NL", raw)})
    _refused(path, "'blk.1.ffn_down.weight'", "IQ4_NL", "does not serve")


def test_corrupt_block_names_tensor(tiny_llama, tmp_path) -> None:
    w = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    raw[5, 0:2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    path = write_gguf(tmp_path / "nan.gguf", tiny_llama, "Q8_0",
                      {"blk.0.ffn_down.weight": ("Q8_0", raw)})
    _refused(path, "'blk.0.ffn_down.weight'", "corrupt")


def test_fused_parts_of_different_kinds_are_refused(tiny_llama, tmp_path) -> None:
    path = write_gguf(tmp_path / "kinds.gguf", tiny_llama,
                      lambda name: "F16" if name == "blk.0.attn_k.weight" else "Q8_0")
    _refused(path, "qkv_proj", "different kinds")


def test_truncated_file_is_refused(files, tmp_path) -> None:
    data = files("F32").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 100])         # the last tensor's data cut short
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        gguf_file.open_reader(cut)
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        LLMEngine(cut, num_blocks=8)


def test_file_cut_in_its_metadata_is_a_value_error(files, tmp_path) -> None:
    cut = tmp_path / "head.gguf"
    cut.write_bytes(files("F32").read_bytes()[:1000])
    with pytest.raises(ValueError, match="head.gguf: not a readable GGUF file"):
        LLMEngine(cut, num_blocks=8)


def test_smollm2_shipped_file(smollm2_gguf, smollm2_dir) -> None:
    llm = LLMEngine(smollm2_gguf, num_blocks=32)
    questions = ["What is the capital of France?", "Name three primary colors."]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                 tokenize=False, add_generation_prompt=True)
               for q in questions]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0),
                        use_tqdm=False)
    assert llm.allocator.num_free == llm.allocator.num_blocks
    # smollm2_dir is transformers' fp32 import of this very file: the same weights
    hf = _checkpoint(smollm2_dir)
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = torch.log_softmax(hf(ids).logits[0], dim=-1)
            greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=16)[0, ids.shape[1]:].tolist()
        ref = want[:-1].gather(1, ids[0, 1:, None])[:, 0]
        got = torch.tensor([p.token.logprob for p in out.prompt_logprobs[1:]])
        assert float((got - ref).abs().max()) < 0.02
        assert out.token_ids == greedy, out.text
    assert "Paris" in outs[0].text
