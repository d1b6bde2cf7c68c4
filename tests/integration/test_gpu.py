"""Checks that only a CUDA GPU can make (skipped elsewhere; ``scripts/gpu_check.sh`` runs them).

They cover what the CPU suite can only approximate with the device guard: bf16 training with the
local and the Transformer Engine layer specs under megatron-core DDP with overlapped gradient
reduction, host synchronisations counted by CUDA itself, the trainer end to end, converters that
leave the GPU untouched, and the HF model split across devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from tests.helpers.subprocess_utils import REPO, subprocess_env

pytestmark = pytest.mark.gpu

VOCAB = 128


def _model(mod_config, use_te: bool, seed: int = 5, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_mod.models import build_gpt_model, llama_config

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = llama_config("tiny", **overrides)
    return build_gpt_model(
        config, mod_config, vocab_size=VOCAB, max_seq_len=256, use_transformer_engine=use_te
    )


def _spec_params():
    from megatron_mod.specs import have_transformer_engine

    te = pytest.param(
        True,
        id="te",
        marks=pytest.mark.skipif(not have_transformer_engine(), reason="no Transformer Engine"),
    )
    return [pytest.param(False, id="local"), te]


@pytest.mark.parametrize("use_te", _spec_params())
def test_bf16_training_with_overlapped_grad_reduce(mcore, use_te):
    """10 bf16 steps, one routed layer forced to keep nothing: DDP must not assert."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_mod import platform
    from megatron_mod.config import MoDConfig
    from megatron_mod.router import set_load_loss_scale

    model = _model(MoDConfig(routed_layers="all", threshold=0.45), use_te, bf16=True)
    with torch.no_grad():
        model.decoder.layers[-1].router.bias.fill_(-30.0)  # this layer keeps no token
    assert all(p.is_cuda for p in model.parameters())
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=10_000
        ),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16),
        [ddp],
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, 128), generator=gen).to(platform.device())
    positions = torch.arange(128, device=platform.device())[None].expand(4, -1)
    losses = []
    for _ in range(10):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        set_load_loss_scale(1)
        loss = ddp(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        updated, grad_norm, _ = optimizer.step()
        assert updated and torch.isfinite(torch.tensor(grad_norm))
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not bool(model.decoder.layers[-1].last_keep.any())
    for layer in model.decoder.layers:
        assert layer.router.weight.dtype == torch.float32


def test_routed_layer_syncs_the_host_once_on_cuda(mcore):
    """CUDA's own sync detector: one synchronisation per routed layer (the compact length)."""
    from megatron_mod import platform
    from megatron_mod.config import MoDConfig

    model = _model(MoDConfig(routed_layers="all", threshold=0.5), use_te=False)
    tokens = torch.randint(0, VOCAB, (2, 128), device=platform.device())
    positions = torch.arange(128, device=platform.device())[None].expand(2, -1)
    model(tokens, positions, None)  # warm-up (lazy allocations)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(tokens, positions, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= model.config.num_layers, [str(w.message) for w in syncs]


def _tiny_hf_model(tmp_path):
    """A small trained LLaMA (quick-start base model) with its corpus, under tmp_path."""

    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/quickstart/make_base_model.py"),
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--layers",
            "4",
            "--hidden-size",
            "64",
            "--vocab-size",
            "600",
        ],
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    return tmp_path / "base"


def test_converters_allocate_nothing_on_the_gpu(tmp_path):
    """Import and export in a child process on a CUDA host: peak GPU memory stays 0."""
    base = _tiny_hf_model(tmp_path)
    probe = (
        "import runpy, sys, torch\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "assert torch.cuda.max_memory_allocated() == 0, torch.cuda.max_memory_allocated()\n"
        "print('peak GPU bytes', torch.cuda.max_memory_allocated())\n"
    )
    for cmd in (
        [str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(base), "--out-dir",
         str(tmp_path / "ckpt")],
        [str(REPO / "tools/convert_megatron_to_hf.py"), "--load", str(tmp_path / "ckpt"),
         "--out-dir", str(tmp_path / "hf")],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", probe, *cmd],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "peak GPU bytes 0" in proc.stdout


def test_hf_model_split_across_devices_matches_one_device(tmp_path):
    """device_map puts layers on cuda:0 and the CPU: masks and gates must follow each layer."""
    from transformers import AutoModelForCausalLM

    base = _tiny_hf_model(tmp_path)
    subprocess.run(
        [sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(base),
         "--out-dir", str(tmp_path / "ckpt"), "--mod-threshold", "0.5",
         "--mod-router-init-bias", "0", "--mod-router-init-std", "2.0"],
        env=subprocess_env(), check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, str(REPO / "tools/convert_megatron_to_hf.py"), "--load",
         str(tmp_path / "ckpt"), "--out-dir", str(tmp_path / "hf")],
        env=subprocess_env(), check=True, capture_output=True,
    )  # fmt: skip
    one = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=True, dtype=torch.float32
    ).to("cuda")
    layers = one.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update(
        {f"model.layers.{i}": (0 if i < layers // 2 else "cpu") for i in range(layers)}
    )
    device_map["model.rotary_emb"] = 0
    split = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=True, dtype=torch.float32, device_map=device_map
    )
    ids = torch.randint(3, 500, (2, 48))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    with torch.no_grad():
        ref = one(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        got = split(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        gen_ref = one.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8)
        gen_split = split.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)
    assert torch.equal(gen_ref.cpu(), gen_split.cpu())


def test_trainer_end_to_end_on_gpu(tmp_path):
    """tools/pretrain_mod.py on one GPU: bf16, overlapped grad reduce, routing active."""
    base = _tiny_hf_model(tmp_path)
    env = subprocess_env()
    run = dict(env=env, check=True, capture_output=True, text=True, timeout=900)
    subprocess.run(
        [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input",
         str(tmp_path / "corpus/train.jsonl"), "--output-prefix", str(tmp_path / "data/text"),
         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(base),
         "--append-eod", "--workers", "1", "--no-progress"],
        **run,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(base),
         "--out-dir", str(tmp_path / "ckpt"), "--mod-routed-layers", "all",
         "--mod-threshold", "0.5", "--mod-router-init-bias", "0", "--mod-router-init-std", "2.0"],
        **run,
    )  # fmt: skip
    summary = tmp_path / "summary.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools/pretrain_mod.py"), "--load", str(tmp_path / "ckpt"),
         "--save", str(tmp_path / "trained"), "--data-path", "1.0",
         str(tmp_path / "data/text_text_document"),
         "--split", "95,5,0", "--seq-length", "128", "--micro-batch-size", "4",
         "--global-batch-size", "8", "--train-iters", "10", "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-warmup-iters", "2", "--eval-iters", "1", "--bf16", "--overlap-grad-reduce",
         "--summary-json", str(summary)],
        **run,
    )  # fmt: skip
    result = json.loads(summary.read_text())
    steps = result["step_metrics"]
    assert len(steps) == 10
    assert all(torch.isfinite(torch.tensor(s["lm_loss"])) for s in steps)
    assert result["valid_lm_loss_after"] < result["valid_lm_loss_before"]
