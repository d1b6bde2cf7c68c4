"""The training-checkpoint bookkeeping: what is a run to resume, stale-write cleanup, pruning,
argument and optimizer-compatibility checks, and clear errors for bad files (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_mod.training import checkpoint as ckpt
from megatron_mod.training.arguments import MEANING_CHANGING_ARGS, check_resume_args

LAYOUT = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}


def _state(iteration: int, **layout) -> ckpt.TrainState:
    return ckpt.TrainState(
        iteration=iteration,
        consumed_samples=8 * iteration,
        scheduler={"num_steps": iteration},
        args={"lr": 1e-3},
        layout={**LAYOUT, "data_parallel_size": 1, "use_distributed_optimizer": False, **layout},
    )


def _iteration(save: Path, it: int, training: bool = True, latest: bool = True) -> Path:
    path = save / f"iter_{it:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if training:
        (path / ckpt.TRAIN_STATE_FILENAME).write_text(_state(it).to_json())
    if latest:
        (save / "latest").write_text(path.name + "\n")
    return path


def test_find_only_training_checkpoints(tmp_path):
    assert ckpt.find_training_checkpoint(tmp_path / "missing") is None
    _iteration(tmp_path, 0, training=False)  # an imported model: a new run starts
    assert ckpt.find_training_checkpoint(tmp_path) is None
    _iteration(tmp_path, 4)
    iter_dir, state = ckpt.find_training_checkpoint(tmp_path)
    assert iter_dir.name == "iter_0000004" and state.iteration == 4
    assert state.consumed_samples == 32 and state.scheduler == {"num_steps": 4}


def test_latest_naming_an_incomplete_iteration_is_an_error(tmp_path):
    path = _iteration(tmp_path, 2)
    (path / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="iter_0000002, which is incomplete"):
        ckpt.find_training_checkpoint(tmp_path)


def test_clean_stale_removes_temporaries_and_restores_an_interrupted_replace(tmp_path):
    _iteration(tmp_path, 2)
    (tmp_path / ".tmp_iter_0000004").mkdir()
    # Killed between the renames that replace iteration 2: only .old_iter_0000002 exists.
    (tmp_path / "iter_0000002").rename(tmp_path / ".old_iter_0000002")
    iter_dir, state = ckpt.find_training_checkpoint(tmp_path)  # read-only, still found
    assert iter_dir.name == "iter_0000002" and state.iteration == 2
    assert not iter_dir.exists()
    assert ckpt.clean_stale(tmp_path) == [".tmp_iter_0000004"]
    assert (tmp_path / "iter_0000002" / ckpt.TRAIN_STATE_FILENAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest"]


def test_prune_keeps_the_newest_training_iterations_and_imports(tmp_path):
    _iteration(tmp_path, 0, training=False)
    for it in (2, 4, 6):
        _iteration(tmp_path, it)
    assert ckpt.prune(tmp_path, 2) == [2]
    assert ckpt.training_iterations(tmp_path) == [4, 6]
    assert (tmp_path / "iter_0000000").is_dir()
    assert ckpt.prune(tmp_path, 0) == []  # 0 keeps everything


def test_train_state_file_errors_name_the_file(tmp_path):
    path = _iteration(tmp_path, 2) / ckpt.TRAIN_STATE_FILENAME
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: invalid JSON"):
        ckpt.read_train_state(path.parent)
    data = json.loads(_state(2).to_json())
    del data["consumed_samples"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing keys \['consumed_samples'\]"):
        ckpt.read_train_state(path.parent)
    path.write_text(json.dumps({**json.loads(_state(2).to_json()), "format_version": 99}))
    with pytest.raises(ValueError, match="newer than this megatron_mod"):
        ckpt.read_train_state(path.parent)


def test_resume_arguments_that_change_the_run_are_refused(tmp_path):
    saved = dict.fromkeys(MEANING_CHANGING_ARGS, 1)
    saved.update(lr=1e-3, data=["1.0", "a"], log_interval=5, tensor_model_parallel_size=1)
    # Layout, logging and the like may change.
    changed = {**saved, "log_interval": 1, "tensor_model_parallel_size": 2}
    check_resume_args(saved, changed, tmp_path)
    with pytest.raises(ValueError) as err:
        check_resume_args(saved, {**saved, "lr": 2e-3, "data": ["1.0", "b"]}, tmp_path)
    assert "--lr: saved 0.001, now 0.002" in str(err.value)
    assert "--data: saved ['1.0', 'a'], now ['1.0', 'b']" in str(err.value)
    assert "--overwrite" in str(err.value)


def test_optimizer_state_compatibility(tmp_path):
    dist = _state(2, use_distributed_optimizer=True, optimizer_format="dp_reshardable")
    new_dp = {**LAYOUT, "data_parallel_size": 4}
    ckpt.check_optimizer_compatible(dist, new_dp, True, tmp_path)  # another DP size loads
    with pytest.raises(ValueError, match="resume without --use-distributed-optimizer"):
        ckpt.check_optimizer_compatible(_state(2), LAYOUT, True, tmp_path)
    with pytest.raises(ValueError, match="--dist-ckpt-optim-fully-reshardable"):
        ckpt.check_optimizer_compatible(
            dist, {**new_dp, "tensor_model_parallel_size": 2}, True, tmp_path
        )
    dist.layout["optimizer_format"] = "fully_reshardable"
    ckpt.check_optimizer_compatible(
        dist, {**new_dp, "tensor_model_parallel_size": 2}, True, tmp_path
    )


def test_train_tokens_and_decay_iters_resolve_to_steps():
    from megatron_mod.training.arguments import parse_args, resolved_args

    base = ["--load", "ckpt", "--save", "out", "--data-path", "1.0", "data/x_text_document"]
    base += ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8"]
    args = parse_args([*base, "--train-tokens", "5000"])
    resolved = resolved_args(args, args.data_path, data_parallel_size=2)
    # 8 sequences x 64 tokens = 512 tokens a step: ceil(5000 / 512) = 10 steps.
    assert resolved["train_iters"] == 10 and resolved["lr_decay_iters"] == 10
    assert resolved["global_batch_size"] == 8
    resolved = resolved_args(
        parse_args([*base, "--train-iters", "7", "--lr-decay-iters", "20"]), ["1.0", "x"], 1
    )
    assert (resolved["train_iters"], resolved["lr_decay_iters"]) == (7, 20)
    with pytest.raises(SystemExit):
        parse_args([*base, "--train-iters", "7", "--train-tokens", "100"])
    with pytest.raises(SystemExit):
        parse_args([*base, "--recompute-granularity", "full"])  # needs method and layers


def test_train_config_takes_every_field_from_the_command_line():
    from megatron_mod.training.arguments import parse_args
    from megatron_mod.training.loop import TrainConfig

    args = parse_args(
        ["--load", "in", "--save", "out", "--data-path", "1.0", "p", "--lr", "2e-4",
         "--weight-decay", "0.05", "--mod-router-lr-mult", "7", "--mod-train-routers-only",
         "--on-nan", "skip", "--tensorboard-dir", "tb"]
    )  # fmt: skip
    cfg = TrainConfig.from_args(args, train_iters=9, num_microbatches=3, lr_decay_iters=8)
    assert (cfg.train_iters, cfg.num_microbatches, cfg.lr_decay_iters) == (9, 3, 8)
    assert (cfg.lr, cfg.weight_decay, cfg.on_nan, cfg.tensorboard_dir) == (2e-4, 0.05, "skip", "tb")
    assert cfg.router_lr_mult == 7.0 and cfg.train_routers_only
    # A field the command line does not have must come from the caller, and only real fields.
    with pytest.raises(ValueError, match="num_microbatches"):
        TrainConfig.from_args(args, train_iters=9, lr_decay_iters=8)
    with pytest.raises(ValueError, match="no field"):
        TrainConfig.from_args(args, train_iters=9, num_microbatches=1, lr_decay_iters=8, lr2=1)
