"""Tests for scripts/make_default_model.py: tiny checkpoints are reproducible, load in
transformers, and exercise the paths the engine must get right (GQA, qkv biases, q/k norms,
head_dim != hidden/heads, llama3 rope, sharded safetensors)."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.make_default_model import make_model  # noqa: E402
from scripts.train_model import train  # noqa: E402
from scripts.train_tokenizer import train_tokenizer  # noqa: E402

MULTI_BYTE = "héllo wörld 日本語 🙂"


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_build_is_deterministic(tmp_path: Path, llama_dir: Path) -> None:
    rng_state = torch.get_rng_state()
    again = make_model(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng_state), "make_model must not reseed the caller"
    assert file_hashes(again) == file_hashes(llama_dir)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(file_hashes(again))


def test_tokenizer_training_is_deterministic() -> None:
    # a cached _train_json would hide nondeterminism, so compare against a fresh training run
    from scripts.train_tokenizer import _train_json
    first = _train_json(1024)
    _train_json.cache_clear()
    assert _train_json(1024) == first


def test_existing_build_is_reused_and_other_settings_rebuild(tmp_path: Path) -> None:
    out = make_model(tmp_path / "m")
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert make_model(tmp_path / "m") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    make_model(tmp_path / "m", seed=1)
    assert json.loads((out / "make_model.json").read_text())["seed"] == 1


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_settings_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_model(tmp_path / "a", arch="gpt2")
    with pytest.raises(ValueError):
        make_model(tmp_path / "b", rope_scaling="longrope")
    assert not (tmp_path / "a").exists()


def test_transformers_loads_model_and_tokenizer(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)


def test_tokenizer_round_trips_multi_byte_text(llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer(MULTI_BYTE).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == MULTI_BYTE
    assert tokenizer.unk_token_id not in ids


def test_chat_template(llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    without = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without == text.removesuffix("<|assistant|>\n")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


@pytest.mark.parametrize("arch,rope_scaling", [("llama", None), ("llama", "llama3"),
                                                ("qwen2", None), ("qwen3", None)])
def test_each_arch_generates(tmp_path: Path, arch: str, rope_scaling: str | None) -> None:
    out = make_model(tmp_path / arch, arch=arch, rope_scaling=rope_scaling)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch
    ids = tokenizer("The value of", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    if rope_scaling:
        assert model.config.rope_parameters["rope_type"] == "llama3"
        assert model.config.rope_parameters["original_max_position_embeddings"] == 256


def test_greedy_logits_have_no_near_ties(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer(["The value of the expression", "Return a list of"],
                    return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        top2 = model(ids).logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4


def test_qwen2_biases_and_qwen3_norms_are_not_defaults(tmp_path: Path) -> None:
    qwen2 = tensors(make_model(tmp_path / "qwen2", arch="qwen2"))
    biases = [t for name, t in qwen2.items() if name.endswith("_proj.bias")]
    assert len(biases) == 2 * 3 and all(t.abs().min() > 0 for t in biases)
    qwen3_dir = make_model(tmp_path / "qwen3", arch="qwen3")
    qwen3 = tensors(qwen3_dir)
    q_norm = qwen3["model.layers.0.self_attn.q_norm.weight"]
    assert q_norm.shape == (32,) and not torch.allclose(q_norm, torch.ones_like(q_norm))
    config = json.loads((qwen3_dir / "config.json").read_text())
    assert config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]


def test_sharded_build_loads_like_unsharded(tmp_path: Path, llama_dir: Path) -> None:
    out = make_model(tmp_path / "sharded", shards=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (out / "model.safetensors").exists()
    whole, sharded = tensors(llama_dir), tensors(out)
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(whole[name], sharded[name]) for name in whole)
    AutoModelForCausalLM.from_pretrained(out)


def test_training_is_deterministic_and_lowers_loss(tmp_path: Path, llama_dir: Path) -> None:
    first = make_model(tmp_path / "a", train_steps=3)
    second = make_model(tmp_path / "b", train_steps=3)
    assert file_hashes(first) == file_hashes(second)
    assert file_hashes(first)["model.safetensors"] != file_hashes(llama_dir)["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    losses = train(model, train_tokenizer(1024), steps=8, seed=0, batch_size=4, seq_len=32,
                   peak_lr=1e-2)
    assert losses[-1] < losses[0]
