"""The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3.

The families differ only in switches read from the checkpoint's config: bias on the q/k/v
projections (Qwen2), RMSNorm on queries and keys per head (Qwen3), explicit head_dim, tied
embeddings, rope_theta and rope_scaling. Q/K/V and gate/up projections are fused (one matmul
each); the loader concatenates the checkpoint's separate weights into them.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from engine.models.attention import AttentionMetadata, PagedAttention
from engine.models.rope import RotaryEmbedding


@dataclass
class DecoderSpec:
    """The shape of one checkpoint's network, read from its config.json."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization at load (``quantization: int8 | int4``): symmetric, one scale
    per ``group_size`` inputs of a row (``kernels.quantize``)."""
    bits: int
    group_size: int

    @property
    def head(self) -> "Quantization":
        """The output head's (a tied embedding's too): 8 bits where the layers get 4, as
        llama.cpp's Q4_0 files keep it at Q8_0; the head is the most sensitive matrix."""
        return Quantization(max(self.bits, 8), self.group_size)


class Linear(torch.nn.Linear):
    """``nn.Linear`` whose weight comes dense (``weight``) or in a stored format (``stored``:
    quantized ``kernels.Lanes`` or a dense tensor of another dtype, from a GGUF file). Once
    ``pack`` has run it keeps only its packed weight for ``kernels.linear_packed`` where the
    kernels take it (on CPU any format, under Triton quantized lanes); elsewhere a dense
    weight and ``F.linear``. A row-parallel shard (engine/models/sharding.py) has a
    ``group``: its output is the sum of every rank's."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.packed = None
        self.stored: kernels.Lanes | torch.Tensor | None = None
        self.group = None

    def pack(self, arena: kernels.HugePageArena, quantization: Quantization | None) -> None:
        """Replace the weight by its packed form (in ``arena`` on CPU) where the kernels
        apply: the stored format, else the dense weight in its dtype (fp32, bf16, fp16; fp32
        quantized first if asked). Elsewhere the weight stays (or becomes) dense: the
        reference computes on the same values."""
        source = self.stored
        if source is None:
            source = self.weight
            if quantization is not None:
                source = kernels.quantize(self.weight, quantization.bits,
                                          quantization.group_size)
        packed = None if source is None else kernels.pack_linear(source, arena)
        if packed is not None:
            self.packed = packed
            self.weight = None      # a tied weight stays with its other owner
        elif isinstance(source, kernels.Lanes):
            self.weight = torch.nn.Parameter(source.dequantize(), requires_grad=False)
        elif self.stored is not None:
            self.weight = torch.nn.Parameter(self.stored.float(), requires_grad=False)
        self.stored = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = kernels.linear_packed(x, self.packed, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y


class RMSNorm(torch.nn.Module):
    """RMSNorm; given the residual stream, it first adds ``x`` into it (in place) and
    normalizes the sum, returning both, as the decoder layers chain them."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            residual.add_(x)
            x = residual
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if residual is None else (out, residual)


class SelfAttention(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        h, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = h * d, kvh * d
        self.qkv_proj = Linear(spec.hidden_size, (h + 2 * kvh) * d, bias=spec.qkv_bias)
        self.o_proj = Linear(h * d, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.rope = rope
        self.attn = PagedAttention(h, kvh, d)

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        a = self.attn
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(rot, q, k)
        return self.o_proj(a(q, k, v, meta).flatten(1))


class MLP(torch.nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size,
                                            bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size,
                                         bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(torch.nn.Module):
    """Pre-norm attention + gated MLP, module by module. Once ``pack`` has packed its weights
    (on CPU, in their format), the model runs it inside one compiled call for all layers
    (``kernels.bind_decoder``), with the same arithmetic in fp32 activations."""

    def __init__(self, spec: DecoderSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = SelfAttention(spec, rope)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def pack(self, arena: kernels.HugePageArena, quantization: Quantization | None
             ) -> tuple[list, list[torch.Tensor | None]] | None:
        """Pack the linear layers; their weights and extras (norms and biases in fp32, as the
        compiled call computes) for ``kernels.bind_decoder``, or None where the compiled
        kernels do not apply."""
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        for linear in linears:
            linear.pack(arena, quantization)
        if any(linear.packed is None for linear in linears):
            return None
        weights = [self.input_layernorm.weight.float(), attn.qkv_proj.packed, attn.o_proj.packed,
                   self.post_attention_layernorm.weight.float(), mlp.gate_up_proj.packed,
                   mlp.down_proj.packed]
        norms = [None if n is None else n.weight for n in (attn.q_norm, attn.k_norm)]
        extras = [None if t is None else t.float()
                  for t in [linear.bias for linear in linears] + norms]
        return weights, extras

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                rot: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's output, not yet added into ``residual``; returns this
        layer's the same way (the adds are fused into the norms that follow them)."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rot, meta), residual)
        return self.mlp(h), residual


class DecoderModel(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, max_positions: int) -> None:
        super().__init__()
        rope = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)
        self.rope = rope
        self.embed_tokens = torch.nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = torch.nn.ModuleList(DecoderLayer(spec, rope)
                                          for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        # a plain list (not registered): the step reads the caches without module lookups
        self.attentions = [layer.self_attn.attn for layer in self.layers]
        self.k_cache: torch.Tensor | None = None    # every layer's, see set_caches
        self.v_cache: torch.Tensor | None = None
        self.compiled: torch.ScriptObject | None = None     # the whole decoder, once packed
        self.embed_table = None     # the packed embedding table the lookup reads, once packed
        self.vocab_start = 0        # a vocab-parallel shard's first row, summed over group
        self.group = None

    def pack(self, arena: kernels.HugePageArena, quantization: Quantization | None
             ) -> list | None:
        """Pack every layer; what ``bind`` takes, or None where the kernels do not apply."""
        parts = [layer.pack(arena, quantization) for layer in self.layers]
        return parts if all(part is not None for part in parts) else None

    def bind(self, parts: list | None, embed) -> None:
        """Look embedding rows up in ``embed``, the packed table (a tied head's own), in its
        format from now on; where the layers' weights are packed for the compiled CPU
        decoder (``parts``), run the whole decoder as one compiled call."""
        a = self.attentions[0]
        if parts is not None:
            self.compiled = kernels.bind_decoder(
                embed, [w for part in parts for w in part[0]],
                [e for part in parts for e in part[1]], self.norm.weight.float(),
                (self.rope.cos, self.rope.sin), self.norm.eps, a.scale,
                (a.num_heads, a.num_kv_heads, a.head_dim))
            if self.compiled is not None and self.group is not None:
                self.compiled.shard(self.group.group_name, self.vocab_start,
                                    self.embed_tokens.num_embeddings)
        self.embed_table = embed
        self.embed_tokens.weight = None     # the lookup reads the packed table

    def set_caches(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """The KV cache of every layer, ``[layers, blocks, block_size, kv_heads, head_dim]``
        each: layer l's attention gets the views ``[l]``."""
        self.k_cache, self.v_cache = k_cache, v_cache
        for attn, k, v in zip(self.attentions, k_cache, v_cache):
            attn.k_cache, attn.v_cache = k, v

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled.forward(input_ids, positions, self.k_cache, self.v_cache,
                                         meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc)
        residual = self.embed(input_ids)
        x = torch.zeros_like(residual)
        rot = self.rope.table(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, rot, meta)
        return self.norm(x, residual)[0]


    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows; a vocab-parallel shard looks up its own rows (zeros for the
        others) and the group sums them."""
        if self.group is None:
            return self.rows(input_ids)
        table = self.embed_tokens.weight if self.embed_table is None else self.embed_table
        held = table.shape[0] if self.embed_table is None else table.out_features
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < held)
        rows = self.rows(torch.where(owned, local, 0)) * owned[:, None]
        dist.all_reduce(rows, group=self.group)
        return rows

    def rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's embedding rows: from the packed table once bound, in its format."""
        if self.embed_table is not None:
            return kernels.embedding_packed(input_ids, self.embed_table)
        return self.embed_tokens(input_ids)


class CausalLM(torch.nn.Module):
    """Hidden states for a flat batch of tokens; logits only for the rows asked for."""

    def __init__(self, spec: DecoderSpec, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec, max_positions)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.group = None       # tensor parallel: logits shards are gathered at rank 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def pack(self, quantization: Quantization | None = None) -> None:
        """Pack every linear layer's weight for its device's kernels (after loading): on CPU
        back to back in huge pages in the order a step reads them; under Triton quantized
        lanes on the GPU. The head is quantized at ``quantization.head``; a tied embedding
        table is the head's packed weight, an untied one is packed in its own format (never
        quantized at load). Where the kernels do not apply, stored formats become dense
        weights."""
        arena = kernels.HugePageArena()
        embed = self.model.embed_tokens
        stored_embed = getattr(embed, "stored", None)
        parts = self.model.pack(arena, quantization)
        if self.spec.tie_word_embeddings and stored_embed is not None:
            self.lm_head.stored = stored_embed
        self.lm_head.pack(arena, None if quantization is None else quantization.head)
        if self.spec.tie_word_embeddings:
            table = self.lm_head.packed
        else:
            table = kernels.pack_linear(stored_embed if stored_embed is not None
                                        else embed.weight, arena)
        if table is not None:
            self.model.bind(parts, table)
        elif stored_embed is not None:      # the module path: dense, as the reference reads
            dense = (stored_embed.dequantize() if isinstance(stored_embed, kernels.Lanes)
                     else stored_embed.float())
            embed.weight = torch.nn.Parameter(dense, requires_grad=False)
            if self.spec.tie_word_embeddings:
                self.lm_head.weight = embed.weight
        embed.stored = None

    @property
    def kv_heads(self) -> int:
        """The KV heads this rank's cache holds."""
        return self.model.attentions[0].num_kv_heads

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of ``hidden``'s rows; with a group every rank computes its vocabulary shard
        and rank 0 gets them all (the others get their shard)."""
        local = self.lm_head(hidden).float()
        if self.group is None:
            return local
        rank = self.group.rank()
        parts = [torch.empty_like(local) for _ in range(self.group.size())] if rank == 0 else None
        dist.gather(local, parts, group_dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if rank == 0 else local

    def set_caches(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Every layer's KV cache, ``[layers, blocks, block_size, kv_heads, head_dim]`` each."""
        self.model.set_caches(k_cache, v_cache)
