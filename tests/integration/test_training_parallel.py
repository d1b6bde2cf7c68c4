"""Continued pretraining under torchrun gives the same run for any TP/SP/PP/DP layout.

A tiny converted LLaMA with every layer routed (routers initialised so that roughly half the
tokens skip each layer) is trained for a few steps with ``tools/pretrain_mod.py`` in one
process, then under torchrun with data, tensor + sequence, pipeline parallelism and the
distributed optimizer, on the same global batches. Every layout must reproduce the reference's
per-step LM loss, load-reducing loss, gradient norm and kept fractions, its validation loss, and
its trained weights: this exercises megatron-core DDP's gradient averaging, the optimizer's
global-norm clipping, the load loss's scaling and the data-parallel batch sharding together.
Every run uses the device guard, so a host tensor where a GPU run needs the device fails it.
"""

from __future__ import annotations

import pytest

from tests.helpers.training import STEPS, make_converted_tiny_llama, run_pretrain

LAYOUTS = {
    "dp2": (2, []),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
    "tp2_dp2_sp_distributed_optimizer": (
        4,
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"],
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Base model, data and a routed import, then the single-process training run."""
    work = tmp_path_factory.mktemp("train_parallel")
    make_converted_tiny_llama(
        work,
        ["--mod-routed-layers", "all", "--mod-threshold", "0.5", "--mod-router-init-bias", "0",
         "--mod-router-init-std", "2.0"],
    )  # fmt: skip
    return work, run_pretrain(work, "single", 1, [])


@pytest.mark.slow
def test_reference_run_routes_and_learns(reference):
    _, ref = reference
    steps = ref["step_metrics"]
    assert len(steps) == STEPS and ref["layout"]["num_microbatches"] == 4
    kept = list(steps[0]["kept_fraction"].values())
    assert len(kept) == 4 and all(0.15 < f < 0.85 for f in kept), kept
    assert ref["valid_lm_loss_after"] < ref["valid_lm_loss_before"]
    assert all(s["load_loss"] > 0 for s in steps)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_reproduces_the_single_process_run(reference, layout, mcore):
    from megatron_mod.checkpointing import load_model_checkpoint

    work, ref = reference
    nproc, flags = LAYOUTS[layout]
    got = run_pretrain(work, layout, nproc, flags)

    tp = 2 if "--tensor-model-parallel-size" in flags else 1
    pp = 2 if "--pipeline-model-parallel-size" in flags else 1
    assert got["layout"]["data_parallel_size"] == nproc // (tp * pp)
    assert got["layout"]["global_batch_size"] == ref["layout"]["global_batch_size"] == 8
    for mine, theirs in zip(got["step_metrics"], ref["step_metrics"], strict=True):
        assert mine["lm_loss"] == pytest.approx(theirs["lm_loss"], rel=1e-5)
        assert mine["load_loss"] == pytest.approx(theirs["load_loss"], rel=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-6)
        assert mine["kept_fraction"] == pytest.approx(theirs["kept_fraction"], abs=1e-6)
    for key in ("valid_lm_loss_before", "valid_lm_loss_after"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key

    # The trained weights, read back at TP=1/PP=1 from each layout's checkpoint.
    trained, _ = load_model_checkpoint(work / f"trained_{layout}")
    expected = dict(load_model_checkpoint(work / "trained_single")[0].named_parameters())
    routers = 0
    for name, param in trained.named_parameters():
        diff = (param.detach() - expected[name].detach()).abs().max().item()
        assert diff < 2e-5, f"{name}: max |diff| {diff}"
        routers += name.endswith("router.weight")
    assert routers == 4


@pytest.mark.slow
def test_bf16_with_distributed_optimizer_tracks_fp32_and_keeps_routers_fp32(reference):
    import torch

    from megatron_mod.checkpointing import resolve_iteration_dir
    from megatron_mod.checkpointing.streaming import checkpoint_tensor_dtypes

    work, ref = reference
    got = run_pretrain(work, "bf16", 2, ["--bf16", "--use-distributed-optimizer"])
    # bf16 weights with fp32 main weights: the run stays within bf16 rounding of the fp32 one.
    for mine, theirs in zip(got["step_metrics"], ref["step_metrics"], strict=True):
        assert mine["lm_loss"] == pytest.approx(theirs["lm_loss"], rel=2e-3)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=2e-2)
    assert got["valid_lm_loss_after"] < got["valid_lm_loss_before"]
    dtypes = checkpoint_tensor_dtypes(resolve_iteration_dir(work / "trained_bf16"))
    routers = {k: v for k, v in dtypes.items() if ".router." in k}
    # Linear and embedding weights are bf16 (norm weights follow the norm implementation).
    linear = {k: v for k, v in dtypes.items() if k.endswith("weight") and "norm" not in k}
    linear = {k: v for k, v in linear.items() if k not in routers}
    assert len(routers) == 8 and set(routers.values()) == {torch.float32}
    assert len(linear) == 6 and set(linear.values()) == {torch.bfloat16}
