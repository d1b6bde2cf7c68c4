"""An independent pure-torch MoD layer, written from the method's definition (docs/design.md).

It shares no code with megatron_mod or megatron-core's layer: it reads the weights of a
megatron TransformerLayer and recomputes RMSNorm, GQA attention with rotate-half RoPE at the
kept tokens' original positions, causal attention among kept tokens only, SwiGLU, and the gate,
one sequence at a time.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x, positions, base, dim):
    """x: [t, heads, dim]; rotate-half RoPE at integer positions [t]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def dense_layer_on_tokens(layer, h, positions, rotary_base, mask=None):
    """Run a megatron TransformerLayer's math on one sequence's tokens h [t, hidden].

    ``mask``: optional [t, t] bool, True where a query must not see a key (default: causal).
    """
    cfg = layer.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    head_dim = cfg.kv_channels
    q_per_group = heads // groups
    eps = cfg.layernorm_epsilon
    sd = {k: v.detach() for k, v in layer.state_dict().items() if v is not None}

    x = rms_norm(h, sd["input_layernorm.weight"], eps)
    qkv = x @ sd["self_attention.linear_qkv.weight"].t()
    qkv = qkv.view(h.shape[0], groups, (q_per_group + 2) * head_dim)
    q = qkv[..., : q_per_group * head_dim].reshape(h.shape[0], heads, head_dim)
    k = qkv[..., q_per_group * head_dim : (q_per_group + 1) * head_dim]
    v = qkv[..., (q_per_group + 1) * head_dim :]
    q = rope(q, positions, rotary_base, head_dim)
    k = rope(k, positions, rotary_base, head_dim)
    k = k.repeat_interleave(q_per_group, dim=1)
    v = v.repeat_interleave(q_per_group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    if mask is None:
        mask = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool, device=h.device).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(h.shape[0], heads * head_dim)
    h = h + attn @ sd["self_attention.linear_proj.weight"].t()

    x = rms_norm(h, sd["pre_mlp_layernorm.weight"], eps)
    gate, up = (x @ sd["mlp.linear_fc1.weight"].t()).chunk(2, dim=-1)
    return h + (torch.nn.functional.silu(gate) * up) @ sd["mlp.linear_fc2.weight"].t()


def router_logits_reference(layer, hidden):
    """The router's logits [s, b], written out: w . x + b with x = h / rms(h) or h."""
    x = hidden.float()
    if layer.mod_config.router_input == "rms_normed":
        x = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + layer.config.layernorm_epsilon)
    return x @ layer.router.weight.detach().t().squeeze(-1) + layer.router.bias.detach()


def mod_layer_reference(
    layer,
    hidden,
    rotary_base,
    threshold,
    gate_mode,
    keep=None,
    attention_mask=None,
    skipped_kv=False,
):
    """Reference forward of a routed layer on hidden [s, b, h] -> ([s, b, h], keep [s, b]).

    ``attention_mask``: optional megatron mask [b, 1, s, s] (True = masked), restricted to each
    sequence's kept tokens.

    ``skipped_kv``: skipped tokens still provide keys and values. A token's K/V in a layer
    depend only on its own input, so this is the dense layer on the whole sequence with the
    skipped tokens' outputs then discarded (the definition; the layer under test computes it
    without the skipped tokens' queries, attention output or MLP).
    """
    logits = router_logits_reference(layer, hidden)
    gates = torch.sigmoid(logits)
    if keep is None:
        keep = gates >= threshold
        if layer.mod_config.keep_first_token:
            keep[0] = True
    out = hidden.clone()
    for col in range(hidden.shape[1]):
        idx = keep[:, col].nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        h_kept = hidden[idx, col]
        if skipped_kv:
            everything = torch.arange(hidden.shape[0], device=hidden.device)
            mask = None if attention_mask is None else attention_mask[col, 0]
            y = dense_layer_on_tokens(layer, hidden[:, col], everything, rotary_base, mask)[idx]
        else:
            mask = None
            if attention_mask is not None:
                mask = attention_mask[col, 0][idx][:, idx]
            y = dense_layer_on_tokens(layer, h_kept, idx, rotary_base, mask)
        g = gates[idx, col][:, None].to(hidden.dtype)
        if gate_mode == "scale":
            out[idx, col] = h_kept + g * (y - h_kept)
        else:
            out[idx, col] = y
    return out, keep
