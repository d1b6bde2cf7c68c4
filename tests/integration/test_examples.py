"""The multi-node launch scripts in examples/ produce commands the tools accept."""

from __future__ import annotations

import importlib.util
import shlex

import pytest

from tests.helpers.subprocess_utils import REPO, launcher_dry_run

SCRIPTS = {
    "convert_minima_2_3b.sh": ("minima-2-3b", 1, 1),
    "convert_llama2_7b.sh": ("llama2-7b", 2, 1),
    "convert_llama2_13b.sh": ("llama2-13b", 4, 1),
    "convert_llama2_70b.sh": ("llama2-70b", 8, 4),
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_launcher_commands_parse_and_layout_fits_the_model(script):
    from megatron_mod.models import llama_config
    from megatron_mod.training.arguments import parse_args

    preset, tp, pp = SCRIPTS[script]
    proc = launcher_dry_run(script, NNODES="4", NODE_RANK="0", MASTER_ADDR="node001")
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "tools/" in line]
    assert len(commands) == 3, proc.stdout  # import, train, export

    imported = _tool("convert_hf_to_megatron").parse_args(commands[0][2:])
    assert (imported.tp, imported.pp, imported.hf_dir) == (tp, pp, "/models/base")

    train = commands[1]
    launcher = train[: train.index("tools/pretrain_mod.py")]
    assert launcher[launcher.index("--nnodes") + 1] == "4"
    assert launcher[launcher.index("--master_addr") + 1] == "node001"
    args = parse_args(train[train.index("tools/pretrain_mod.py") + 1 :])
    assert args.tensor_model_parallel_size == tp and args.pipeline_model_parallel_size == pp
    assert args.bf16 and args.use_distributed_optimizer and args.load == imported.out_dir
    world = 8 * 4
    dp = world // (tp * pp)
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0
    # The preset's heads, KV groups and layers divide by the layout.
    llama_config(preset, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    exported = _tool("convert_megatron_to_hf").parse_args(commands[2][2:])
    assert exported.ckpt_dir == args.save


def test_launcher_reads_slurm_and_refuses_a_layout_that_does_not_fit():
    proc = launcher_dry_run("convert_llama2_70b.sh", SLURM_NNODES="2", SLURM_NODEID="1",
                    MASTER_ADDR="n0", GPUS_PER_NODE="6")  # fmt: skip
    assert proc.returncode == 2
    assert "12 GPUs are not a multiple of TP x PP = 8 x 4" in proc.stderr
    proc = launcher_dry_run(
        "convert_llama2_7b.sh", SLURM_NNODES="2", SLURM_NODEID="1", MASTER_ADDR="n0"
    )
    assert proc.returncode == 0, proc.stderr
    assert "--node_rank 1" in proc.stdout and "--nnodes 2" in proc.stdout
    assert "convert_hf_to_megatron" not in proc.stdout  # only node 0 imports and exports


def test_srun_one_task_per_gpu_runs_each_rank_directly_and_calibrates_for_a_target():
    """Under srun (a task per GPU) SIGTERM reaches every rank: the trainer is started as the
    rank itself, not under torchrun; with TARGET_COMPUTE the routers are calibrated."""
    from megatron_mod.training.arguments import parse_args

    slurm = dict(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_NTASKS="16", MASTER_ADDR="n0")
    proc = launcher_dry_run("convert_llama2_7b.sh", SLURM_PROCID="11", SLURM_LOCALID="3",
                            **slurm)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (train,) = [shlex.split(line) for line in proc.stdout.splitlines() if "tools/" in line]
    assert "torch.distributed.run" not in train
    assert train[:6] == ["env", "RANK=11", "WORLD_SIZE=16", "LOCAL_RANK=3", "MASTER_ADDR=n0",
                         "MASTER_PORT=29500"]  # fmt: skip
    assert "--exit-signal-handler" in train

    target = dict(TARGET_COMPUTE="0.85", CALIB_DATA="/data/calib.jsonl")
    proc = launcher_dry_run("convert_llama2_7b.sh", SLURM_PROCID="0", SLURM_LOCALID="0",
                            **target, **slurm)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "tools/" in line]
    assert [next(c for c in cmd if c.startswith("tools/")) for cmd in commands] == [
        "tools/calibrate_routers.py", "tools/pretrain_mod.py", "tools/convert_megatron_to_hf.py"
    ]  # fmt: skip
    calibrate = _tool("calibrate_routers").parse_args(commands[0][2:])
    assert (calibrate.target_compute, calibrate.tp, calibrate.data) == (
        0.85,
        2,
        "/data/calib.jsonl",
    )
    train = commands[1]
    args = parse_args(train[train.index("tools/pretrain_mod.py") + 1 :])
    assert args.mod_target_compute == 0.85 and args.load == calibrate.out_dir

    proc = launcher_dry_run("convert_llama2_7b.sh", SLURM_PROCID="0", LAUNCH="srun",
                            SLURM_NNODES="2", SLURM_NTASKS="2", MASTER_ADDR="n0")  # fmt: skip
    assert proc.returncode == 2 and "one task per GPU" in proc.stderr
