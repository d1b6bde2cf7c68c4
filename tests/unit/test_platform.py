"""Process setup (megatron_mod.platform): what an NCCL launch and a pipeline run get."""

from __future__ import annotations

import datetime

import torch

from megatron_mod import platform


def test_nccl_init_binds_the_local_gpu_and_uses_the_long_timeout(monkeypatch):
    calls = {}
    monkeypatch.setattr(platform, "is_cpu_mode", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.setdefault("set_device", dev))
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda **kw: calls.setdefault("init", kw)
    )
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    platform._init_process_group(45.0)
    init = calls["init"]
    assert init["backend"] == "nccl"
    assert init["device_id"] == torch.device("cuda", 3)
    assert calls["set_device"] == torch.device("cuda", 3)
    assert init["timeout"] == datetime.timedelta(minutes=45)
    assert platform.DEFAULT_TIMEOUT_MINUTES > 10  # megatron's 10 can expire on a large index


def test_each_pipeline_stage_seeds_its_own_streams(mcore, monkeypatch):
    from megatron.core import parallel_state

    try:
        platform.initialize(tp=1, pp=1, seed=7)
        assert torch.initial_seed() == 7
        monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 2)
        platform.initialize(tp=1, pp=1, seed=7)
        assert torch.initial_seed() == 207  # Megatron-LM's seed + 100 * pp_rank
    finally:
        monkeypatch.undo()
        platform.initialize(tp=1, pp=1, seed=1234)
