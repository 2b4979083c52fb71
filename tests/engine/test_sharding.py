"""Tensor-parallel shards as views of the weight objects: which rows and columns each rank
keeps (heads, KV heads replicated below the rank count, gate and up, vocabulary), biases of
row-parallel layers on rank 0 only, quantized lanes cut on group boundaries, and sizes that
cannot split named with both numbers."""
import dataclasses

import pytest
import torch

import kernels
from engine.models import load_model
from engine.models.sharding import check, shard


def _layer_weights(model):
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    return attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight


def test_views_of_heads_mlp_and_vocabulary(build_tiny) -> None:
    path = build_tiny("qwen2")      # qkv biases
    full = load_model(path, torch.float32, "cpu", 64)
    spec = full.spec
    h, kvh, d, inter = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
    qkv, o, gate_up, down = (w.detach().clone() for w in _layer_weights(full))
    bias = full.model.layers[0].self_attn.qkv_proj.bias.detach().clone()
    for rank in range(2):
        model = load_model(path, torch.float32, "cpu", 64)
        shard(model, rank, 2, None)
        s_qkv, s_o, s_gate_up, s_down = _layer_weights(model)
        q = slice(rank * h // 2 * d, (rank + 1) * h // 2 * d)
        kv = slice(rank * kvh // 2 * d, (rank + 1) * kvh // 2 * d)
        k_rows, v_rows = qkv[h * d:h * d + kvh * d], qkv[h * d + kvh * d:]
        assert torch.equal(s_qkv, torch.cat([qkv[q], k_rows[kv], v_rows[kv]]))
        assert torch.equal(model.model.layers[0].self_attn.qkv_proj.bias,
                           torch.cat([bias[q], bias[h * d:h * d + kvh * d][kv],
                                      bias[h * d + kvh * d:][kv]]))
        assert torch.equal(s_o, o[:, q])
        cut = slice(rank * inter // 2, (rank + 1) * inter // 2)
        assert torch.equal(s_gate_up, torch.cat([gate_up[:inter][cut], gate_up[inter:][cut]]))
        assert torch.equal(s_down, down[:, cut])
        vocab = spec.vocab_size // 2
        assert torch.equal(model.model.embed_tokens.weight,
                           full.model.embed_tokens.weight[rank * vocab:(rank + 1) * vocab])
        assert model.model.vocab_start == rank * vocab
        attn = model.model.layers[0].self_attn.attn
        assert (attn.num_heads, attn.num_kv_heads) == (h // 2, kvh // 2)


def test_kv_head_replicated_and_row_parallel_bias_on_rank_0(build_tiny) -> None:
    path = build_tiny("llama")
    model = load_model(path, torch.float32, "cpu", 64)
    spec = model.spec
    full_qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    o = model.model.layers[0].self_attn.o_proj
    o.bias = torch.nn.Parameter(torch.ones(spec.hidden_size), requires_grad=False)
    shard(model, 3, 4, None)    # 4 ranks over 2 KV heads: ranks 2 and 3 read KV head 1
    h, d = spec.num_heads, spec.head_dim
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape[0] == (h // 4 + 2) * d
    assert torch.equal(qkv[d:2 * d], full_qkv[h * d + d:h * d + 2 * d])
    assert model.kv_heads == 1
    assert o.bias is None       # added once, by rank 0


def test_lanes_columns_on_group_boundaries() -> None:
    w = torch.randn(8, 128)
    lanes = kernels.quantize(w, 4, 32)
    part = lanes.columns(32, 96)
    assert part.shape == (8, 64) and part.scales.shape == (8, 2)
    assert torch.equal(part.dequantize(), lanes.dequantize()[:, 32:96])
    with pytest.raises(ValueError, match="inputs 16:80 .* groups of 32 .* group boundaries"):
        lanes.columns(16, 80)


def test_row_parallel_shard_off_group_boundaries_is_an_error(build_tiny) -> None:
    model = load_model(build_tiny("llama"), torch.float32, "cpu", 64)
    o = model.model.layers[0].self_attn.o_proj      # 64 inputs: 32 a rank
    o.stored = kernels.quantize(o.weight.detach(), 8, 64)
    with pytest.raises(ValueError, match="row-parallel layer: inputs 0:32 .* groups of 64"):
        shard(model, 0, 2, None)


@pytest.mark.parametrize("size,message", [
    (3, r"tensor_parallel_size 3 does not divide the 4 attention heads"),
    (4, None),
    (8, r"tensor_parallel_size 8 does not divide the 4 attention heads")])
def test_check_names_both_numbers(build_tiny, size: int, message: str | None) -> None:
    spec = load_model(build_tiny("llama"), torch.float32, "cpu", 64).spec
    if message is None:
        check(spec, size)       # 4 heads, 2 KV heads: each KV head read by 2 ranks
    else:
        with pytest.raises(ValueError, match=message):
            check(spec, size)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 and the 3 KV heads"):
        check(dataclasses.replace(spec, num_heads=12, num_kv_heads=3), 4)
