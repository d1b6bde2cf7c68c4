"""The one mapping between Hugging Face LLaMA parameters and megatron-core GPT parameters.

Import (HF -> Megatron) and export (Megatron -> HF) both go through :func:`param_mappings`, so
each layout fact is written once:

============================================  ==================================================
megatron-core (local spec, global layer i)    Hugging Face ``LlamaForCausalLM``
============================================  ==================================================
``embedding.word_embeddings.weight``          ``model.embed_tokens.weight`` (rows padded)
``decoder.layers.i.input_layernorm.weight``   ``model.layers.i.input_layernorm.weight``
``decoder.layers.i.self_attention.            ``model.layers.i.self_attn.{q,k,v}_proj.weight``
linear_qkv.weight``                           (fused per query group, see :func:`fuse_qkv`)
``decoder.layers.i.self_attention.            ``model.layers.i.self_attn.{q,k,v}_proj.bias``
linear_qkv.bias`` (Qwen2 only)                (fused like the weight)
``decoder.layers.i.self_attention.            ``model.layers.i.self_attn.o_proj.weight``
linear_proj.weight``
``decoder.layers.i.pre_mlp_layernorm.weight`` ``model.layers.i.post_attention_layernorm.weight``
``decoder.layers.i.mlp.linear_fc1.weight``    ``model.layers.i.mlp.{gate,up}_proj.weight``
                                              (``cat(gate, up)``)
``decoder.layers.i.mlp.linear_fc2.weight``    ``model.layers.i.mlp.down_proj.weight``
``decoder.layers.i.router.{weight,bias}``     ``model.layers.i.router.{weight,bias}`` (MoD only)
``decoder.final_layernorm.weight``            ``model.norm.weight``
``output_layer.weight``                       ``lm_head.weight`` (rows padded; absent when tied)
============================================  ==================================================

With the Transformer Engine spec the two pre-norms are fused into the following linear layers
and are named ``self_attention.linear_qkv.layer_norm_weight`` and
``mlp.linear_fc1.layer_norm_weight``; :func:`canonical_megatron_name` folds those names onto the
local ones. megatron-core's ``torch_dist`` checkpoints always use the TE names, with the layer
index moved into a leading tensor axis (:func:`checkpoint_key`).

RoPE needs no permutation: HF LLaMA applies rotate-half RoPE to q/k in the HF checkpoint layout,
which is exactly what megatron-core's (unfused) rotary embedding does with the same weights.

Tensor parallelism: the full (TP=1) tensors above are what a ``torch_dist`` checkpoint stores;
megatron-core reshards them on load. :func:`tp_shard` gives the slice a live TP rank holds (fused
QKV split by query groups, fc1 as each rank's slice of gate followed by its slice of up, row /
column splits for the other linears and the vocabulary), for code that hands tensors to a model
directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LlamaDims",
    "ParamMapping",
    "padded_vocab_size",
    "pad_vocab",
    "fuse_qkv",
    "split_qkv",
    "fuse_gate_up",
    "split_gate_up",
    "canonical_megatron_name",
    "checkpoint_key",
    "layer_index",
    "layer_param_mappings",
    "param_mappings",
    "hf_param_shapes",
    "tp_shard",
    "TE_NAME_ALIASES",
]

# Local-spec name suffix -> TE-spec (and checkpoint) name suffix.
TE_NAME_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Vocabulary size rounded up so every TP rank holds an equal, aligned slice.

    Same rule as Megatron-LM's ``--make-vocab-size-divisible-by``: a multiple of
    ``divisible_by * tp``.

    Args:
        vocab_size: the tokenizer's (true) vocabulary size.
        tp: tensor-model-parallel size.
        divisible_by: ``make_vocab_size_divisible_by`` (128 in Megatron-LM).
    """
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(
            f"padded_vocab_size needs positive arguments, got vocab_size={vocab_size}, tp={tp}, "
            f"divisible_by={divisible_by}"
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Pad an embedding / output matrix [vocab, hidden] to ``padded_size`` rows.

    Padding rows repeat the last real row (as Megatron-LM's LLaMA loader does): the padded output
    logits then equal the last real token's logit, so they can never win an argmax over the real
    vocabulary, and padded input rows are never looked up.
    """
    vocab = weight.shape[0]
    if padded_size < vocab:
        raise ValueError(f"cannot pad a vocabulary of {vocab} rows down to {padded_size}")
    if padded_size == vocab:
        return weight
    fill = weight[-1:].expand(padded_size - vocab, -1)
    return torch.cat([weight, fill], dim=0)


@dataclass(frozen=True)
class LlamaDims:
    """The shape facts the mapping needs (identical for HF and megatron-core).

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width.
        num_attention_heads: query heads.
        num_query_groups: key/value heads (GQA groups); equal to heads without GQA.
        head_dim: per-head width (``kv_channels`` in megatron-core).
        ffn_hidden_size: SwiGLU inner width.
        vocab_size: true vocabulary size (HF side).
        padded_vocab_size: megatron-side rows of the embedding / output layer.
        qkv_bias: q/k/v projections carry biases (Qwen2 / Qwen2.5; megatron ``add_qkv_bias``).
        tied: input embedding and output layer are one matrix (``tie_word_embeddings``;
            megatron ``share_embeddings_and_output_weights``): no ``output_layer.weight`` /
            ``lm_head.weight``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    qkv_bias: bool = False
    tied: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: (heads + 2 * groups) * head_dim."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim


# ------------------------------------------------------------------------------ transforms


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: LlamaDims) -> torch.Tensor:
    """HF q/k/v projections -> megatron-core's fused ``linear_qkv`` weight.

    megatron-core lays the fused weight out per query group: for each group g the rows of its
    ``heads_per_group`` query heads, then its key head, then its value head. Splitting the rows
    into TP contiguous blocks therefore gives each rank whole groups.

    Args:
        q: [heads * head_dim, hidden]; k, v: [groups * head_dim, hidden].
        dims: model shape.

    Returns:
        [(heads + 2 * groups) * head_dim, hidden].
    """
    if q.dim() == 1:  # biases [rows]: the same row layout
        return fuse_qkv(q[:, None], k[:, None], v[:, None], dims)[:, 0]
    groups, hd, hidden = dims.num_query_groups, dims.head_dim, q.shape[-1]
    q = q.reshape(groups, dims.heads_per_group * hd, hidden)
    k = k.reshape(groups, hd, hidden)
    v = v.reshape(groups, hd, hidden)
    return torch.cat([q, k, v], dim=1).reshape(dims.qkv_rows, hidden)


def split_qkv(
    qkv: torch.Tensor, dims: LlamaDims
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: fused weight (or bias) -> (q, k, v) in HF layout."""
    if qkv.dim() == 1:
        return tuple(t[:, 0] for t in split_qkv(qkv[:, None], dims))
    groups, hd, hidden = dims.num_query_groups, dims.head_dim, qkv.shape[-1]
    per_group = qkv.reshape(groups, (dims.heads_per_group + 2) * hd, hidden)
    q, k, v = torch.split(per_group, [dims.heads_per_group * hd, hd, hd], dim=1)
    return (
        q.reshape(dims.num_attention_heads * hd, hidden),
        k.reshape(groups * hd, hidden),
        v.reshape(groups * hd, hidden),
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``gate_proj`` / ``up_proj`` -> megatron's SwiGLU ``linear_fc1`` (``cat(gate, up)``).

    megatron computes ``silu(x @ W[:F].T) * (x @ W[F:].T)``; the global (TP=1) weight is the
    plain concatenation, and its checkpoint entry keeps that layout for every TP size.
    """
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# ------------------------------------------------------------------------------ names


def canonical_megatron_name(name: str) -> str:
    """Fold TE-spec names (fused layer norms) onto the local-spec names used by the mapping."""
    for local, te in TE_NAME_ALIASES.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


def layer_index(name: str) -> int | None:
    """Layer index in ``decoder.layers.{i}.…`` (megatron) or ``model.layers.{i}.…`` (HF)."""
    match = _LAYER_RE.match(name) or _HF_LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoint_key(name: str) -> tuple[str, int | None]:
    """The ``torch_dist`` checkpoint key of a megatron parameter, and its layer axis offset.

    megatron-core stacks a parameter of all layers into one checkpoint tensor with a leading
    ``num_layers`` axis (key without the index), and names pre-norms by their TE names. Router
    parameters exist on routed layers only, so they keep the layer index in the key and have no
    layer axis (see ``megatron_mod.checkpointing.model_sharded_state_dict``).

    Args:
        name: a global megatron parameter name (local or TE spec).

    Returns:
        (key, layer index along the leading axis, or None for an unstacked tensor).
    """
    name = canonical_megatron_name(name)
    match = _LAYER_RE.match(name)
    if not match:
        return name, None
    index, suffix = int(match.group(1)), match.group(2)
    if suffix.startswith("router."):
        return name, None
    suffix = TE_NAME_ALIASES.get(suffix, suffix)
    return f"decoder.layers.{suffix}", index


# ------------------------------------------------------------------------------ the mapping


@dataclass(frozen=True)
class ParamMapping:
    """One megatron-core parameter and the HF tensor(s) it is made of.

    Attributes:
        megatron_name: global local-spec name, e.g. ``decoder.layers.3.mlp.linear_fc1.weight``.
        hf_names: HF tensor names, in the order ``to_megatron`` takes them.
        megatron_shape: full (TP=1) megatron shape.
        hf_shapes: shape of each HF tensor.
        to_megatron: HF tensors -> megatron tensor.
        to_hf: megatron tensor -> HF tensors (same order as ``hf_names``).
    """

    megatron_name: str
    hf_names: tuple[str, ...]
    megatron_shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_megatron: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Sequence[torch.Tensor]]


def _identity(name: str, hf_name: str, shape: tuple[int, ...]) -> ParamMapping:
    return ParamMapping(name, (hf_name,), shape, (shape,), lambda t: t[0], lambda t: (t,))


def _vocab(name: str, hf_name: str, dims: LlamaDims) -> ParamMapping:
    return ParamMapping(
        name,
        (hf_name,),
        (dims.padded_vocab_size, dims.hidden_size),
        ((dims.vocab_size, dims.hidden_size),),
        lambda t: pad_vocab(t[0], dims.padded_vocab_size),
        lambda t: (t[: dims.vocab_size],),
    )


def layer_param_mappings(dims: LlamaDims, i: int, routed: bool) -> list[ParamMapping]:
    """The mappings of global layer ``i`` (with its router when ``routed``)."""
    h, hd, f = dims.hidden_size, dims.head_dim, dims.ffn_hidden_size
    m, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
    q_rows, kv_rows = dims.num_attention_heads * hd, dims.num_query_groups * hd
    out = [
        _identity(m + "input_layernorm.weight", hf + "input_layernorm.weight", (h,)),
        ParamMapping(
            m + "self_attention.linear_qkv.weight",
            tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
            (dims.qkv_rows, h),
            ((q_rows, h), (kv_rows, h), (kv_rows, h)),
            lambda t: fuse_qkv(*t, dims),
            lambda t: split_qkv(t, dims),
        ),
    ]
    if dims.qkv_bias:
        out.append(
            ParamMapping(
                m + "self_attention.linear_qkv.bias",
                tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"),
                (dims.qkv_rows,),
                ((q_rows,), (kv_rows,), (kv_rows,)),
                lambda t: fuse_qkv(*t, dims),
                lambda t: split_qkv(t, dims),
            )
        )
    out += [
        _identity(
            m + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight", (h, q_rows)
        ),
        _identity(m + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", (h,)),
        ParamMapping(
            m + "mlp.linear_fc1.weight",
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
            (2 * f, h),
            ((f, h), (f, h)),
            lambda t: fuse_gate_up(*t),
            split_gate_up,
        ),
        _identity(m + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight", (h, f)),
    ]
    if routed:
        out += [
            _identity(m + "router.weight", hf + "router.weight", (1, h)),
            _identity(m + "router.bias", hf + "router.bias", (1,)),
        ]
    return out


def param_mappings(dims: LlamaDims, routed_layers: Sequence[int] = ()) -> list[ParamMapping]:
    """Every parameter of the model, in HF checkpoint order (embeddings, layers, norm, head).

    Args:
        dims: model shape.
        routed_layers: global indices of MoD-routed layers (their routers are included).
    """
    routed = set(routed_layers)
    out = [_vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", dims)]
    for i in range(dims.num_layers):
        out += layer_param_mappings(dims, i, i in routed)
    out.append(
        _identity("decoder.final_layernorm.weight", "model.norm.weight", (dims.hidden_size,))
    )
    if not dims.tied:
        out.append(_vocab("output_layer.weight", "lm_head.weight", dims))
    return out


def hf_param_shapes(dims: LlamaDims, routed_layers: Sequence[int] = ()) -> dict[str, tuple]:
    """HF tensor name -> shape for a model of these dims (used to validate inputs)."""
    return {
        name: shape
        for mapping in param_mappings(dims, routed_layers)
        for name, shape in zip(mapping.hf_names, mapping.hf_shapes)
    }


# ------------------------------------------------------------------------------ TP slices


def tp_shard(name: str, tensor: torch.Tensor, tp: int, rank: int, dims: LlamaDims) -> torch.Tensor:
    """The slice of a full (TP=1) megatron tensor that TP rank ``rank`` of ``tp`` holds.

    Only needed when handing tensors to a live TP-sharded model; ``torch_dist`` checkpoints store
    full tensors and megatron-core slices them on load.

    Args:
        name: megatron parameter name (local or TE spec, global or local layer index).
        tensor: the full tensor.
        tp: tensor-model-parallel size.
        rank: tensor-model-parallel rank.
        dims: model shape (for divisibility checks).
    """
    if tp == 1:
        return tensor
    name = canonical_megatron_name(name)
    if dims.num_query_groups % tp or dims.padded_vocab_size % tp or dims.ffn_hidden_size % tp:
        raise ValueError(
            f"tp={tp} must divide num_query_groups={dims.num_query_groups}, "
            f"ffn_hidden_size={dims.ffn_hidden_size} and padded vocab {dims.padded_vocab_size}"
        )
    if name.endswith("mlp.linear_fc1.weight"):
        # Each rank holds its slice of gate followed by its slice of up.
        gate, up = split_gate_up(tensor)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0)
    if name.endswith(
        ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
    ):
        # Column-parallel: rows split. QKV rows are grouped, so each rank gets whole groups.
        return tensor.chunk(tp, 0)[rank]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return tensor.chunk(tp, 1)[rank]  # row-parallel: input columns split
    return tensor  # norms and routers are replicated
