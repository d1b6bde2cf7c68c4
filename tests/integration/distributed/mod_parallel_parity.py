"""Run one training step of a routed tiny model under a given TP/PP/SP layout (torchrun, gloo).

Two modes:
  ``--save CKPT``: single process, build the reference model (routing active) and save it as a
      megatron-core torch_dist checkpoint, so every layout starts from the same weights.
  ``--load CKPT --out JSON``: load that checkpoint with this run's TP/PP/SP and run one
      forward/backward step through megatron-core's pipeline schedule with 2 micro-batches;
      rank 0 writes the LM loss, the load loss, per-layer kept fractions and the global
      gradient norm.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

NUM_LAYERS = 4
VOCAB = 128
SEQ = 32
MICRO_BATCH = 2
NUM_MICROBATCHES = 2


SKIPPED_KV = False  # --skipped-kv: skipped tokens still write K/V


def _mod_config():
    from megatron_mod.config import MoDConfig

    # compact_length_multiple=1: the compact batch really shrinks at this short sequence length
    # (the default multiple, 64, would cap it at the full 32 tokens).
    return MoDConfig(
        routed_layers="all", threshold=0.5, load_loss_coeff=0.05, compact_length_multiple=1,
        skipped_kv=SKIPPED_KV,
    )  # fmt: skip


def _build(tp: int, pp: int, sp: bool):
    from megatron_mod.models import build_gpt_model, llama_config

    config = llama_config(
        "tiny",
        num_layers=NUM_LAYERS,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
    )
    return build_gpt_model(config, _mod_config(), vocab_size=VOCAB, max_seq_len=SEQ), config


def _batches():
    from megatron_mod import platform

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=gen)
    tokens = tokens.to(platform.device())
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def save(ckpt: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_mod import platform

    platform.initialize(tp=1, pp=1, seed=1234)
    model, _ = _build(1, 1, False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                # A router that keeps roughly half of the tokens.
                param.copy_(torch.randn(param.shape, generator=gen) * 2.0)
            elif name.endswith("router.bias"):
                param.zero_()
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    platform.destroy()


def _grad_norm(model) -> float:
    """Global L2 norm of the gradients, each parameter counted once across TP/PP."""
    from megatron.core import parallel_state

    from megatron_mod import platform

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    total = torch.zeros(1, device=platform.device())
    for param in model.parameters():
        if param.grad is None:
            continue
        sharded = getattr(param, "tensor_model_parallel", False)
        if sharded or tp_rank == 0:
            total += param.grad.float().pow(2).sum()
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return math.sqrt(float(total))


def run(ckpt: str, out: str, tp: int, pp: int, sp: bool) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mod import platform
    from megatron_mod.metrics import get_metrics_tracker
    from megatron_mod.router import set_load_loss_scale

    platform.initialize(tp=tp, pp=pp, seed=1234)
    model, config = _build(tp, pp, sp)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
    model.load_state_dict(state)
    model.train()

    batches = iter(_batches())
    positions = torch.arange(SEQ, device=platform.device())[None].expand(MICRO_BATCH, -1)

    def loss_func(loss_mask, output):
        loss = (output * loss_mask).sum() / loss_mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        output = model(tokens, positions, None, labels=labels)
        return output, lambda out: loss_func(torch.ones_like(labels, dtype=torch.float), out)

    tracker = get_metrics_tracker()
    tracker.clear()
    set_load_loss_scale(NUM_MICROBATCHES)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model,
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    # What megatron's finalize_model_grads does for norms/routers under sequence parallelism.
    if sp:
        for param in model.parameters():
            if getattr(param, "sequence_parallel", False) and param.grad is not None:
                torch.distributed.all_reduce(
                    param.grad, group=parallel_state.get_tensor_model_parallel_group()
                )

    lm_loss = torch.zeros(1, device=platform.device())
    if parallel_state.is_pipeline_last_stage():
        lm_loss += sum(float(x["lm loss"]) for x in losses) / len(losses)
    torch.distributed.all_reduce(lm_loss, group=parallel_state.get_pipeline_model_parallel_group())
    stats = tracker.summary(NUM_LAYERS, groups=[parallel_state.get_pipeline_model_parallel_group()])
    router_grads = torch.zeros(NUM_LAYERS, 2, device=platform.device())
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        for layer in model.decoder.layers:
            router = layer.router
            router_grads[layer.global_layer_index, 0] = router.bias.grad[0]
            router_grads[layer.global_layer_index, 1] = router.weight.grad.norm()
    torch.distributed.all_reduce(router_grads, group=parallel_state.get_model_parallel_group())
    grad_norm = _grad_norm(model)
    result = {
        "lm_loss": float(lm_loss),
        "load_loss": sum(s.load_loss for s in stats.values()),
        "kept_fraction": {str(k): s.kept_fraction for k, s in stats.items()},
        "grad_norm": grad_norm,
        "router_bias_grad": router_grads[:, 0].tolist(),
        "router_weight_grad_norm": router_grads[:, 1].tolist(),
        "world_size": torch.distributed.get_world_size(),
        "sequence_parallel": config.sequence_parallel,
    }
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    platform.destroy()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--skipped-kv", action="store_true")
    args = parser.parse_args()
    global SKIPPED_KV
    SKIPPED_KV = args.skipped_kv
    if args.save:
        save(args.save)
    else:
        run(args.load, args.out, args.tp, args.pp, args.sp)


if __name__ == "__main__":
    main()
