"""Long runs survive: periodic checkpoints, exact resume, preemption and the NaN guard.

A tiny converted LLaMA (every layer routed, about half the tokens kept) is trained with
``tools/pretrain_mod.py --save-interval 2`` and the compute-target controller. Each test
interrupts a run in a way a cluster does (kill -9 after a checkpoint or in the middle of
writing one, SIGTERM, a NaN) and re-runs the identical command: the continued run must log the
same per-step LM loss, load loss, gradient norm, learning rate and kept fractions as the
uninterrupted run, bit for bit (the same layout on CPU is deterministic), also under torchrun
(DP 2, TP 2, distributed optimizer with bf16). A checkpoint saved under one layout resumes
under another (one process -> TP 2, DP 2 -> PP 2) within fp32 reduction-order tolerance.

The reference and the torchrun runs use the device guard (``MEGATRON_MOD_DEVICE_GUARD=1``): a
batch, loss mask or reduction buffer left on the host fails the run as it would on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.subprocess_utils import (
    DISTRIBUTED_SCRIPTS,
    REPO,
    python_launcher,
    subprocess_env,
)

STEPS = 6
COMMON = [
    "--split", "95,5,0", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", str(STEPS), "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-warmup-iters", "1", "--eval-iters", "1", "--log-interval", "1", "--save-interval", "2",
    # The compute-target controller moves the load-loss coefficients every step: a resume that
    # lost its state would log another load loss.
    "--mod-target-compute", "0.35", "--mod-target-warmup-steps", "2",
]  # fmt: skip
METRICS = ("lm_loss", "load_loss", "grad_norm", "lr", "kept_fraction")
FAULTS = DISTRIBUTED_SCRIPTS / "train_faults.py"

pytestmark = pytest.mark.slow


def _env(guard: bool = True) -> dict[str, str]:
    return dict(subprocess_env(), MEGATRON_MOD_DEVICE_GUARD="1" if guard else "0")


def _command(work: Path, save: str, nproc: int = 1, flags=(), script=None, fault=()) -> list:
    launcher = python_launcher(nproc)
    script = script or REPO / "tools" / "pretrain_mod.py"
    return [
        *launcher, str(script), *fault,
        "--load", str(work / "ckpt"), "--save", str(work / save),
        "--data-path", "1.0", str(work / "data" / "stdlib_text_document"),
        *COMMON, *flags,
    ]  # fmt: skip


class _Proc:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _start(cmd: list, out: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session, output to files (a killed trainer's helpers may outlive
    it, e.g. megatron-core's checkpoint-writer manager, and would hold a pipe open)."""
    # The device guard slows each step several-fold: the reference and the first run of each
    # torchrun test use it (the resumed runs execute the same code).
    torchrun = "--nproc_per_node=2" in " ".join(map(str, cmd))
    guard = out.stem == "ref" or (torchrun and "resumed" not in out.stem)
    with open(out.with_suffix(".out"), "w") as stdout, open(out.with_suffix(".err"), "w") as err:
        return subprocess.Popen(
            cmd, env=_env(guard), stdout=stdout, stderr=err, text=True, start_new_session=True
        )


def _finish(proc: subprocess.Popen, out: Path, timeout: int = 600) -> _Proc:
    """Wait for ``proc``, then end whatever it left in its session (as a job scheduler does)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return _Proc(
        proc.returncode,
        out.with_suffix(".out").read_text(),
        out.with_suffix(".err").read_text(),
    )


def _run(cmd: list, summary: Path | None = None, expect_rc: int = 0, log: Path | None = None):
    if summary is not None:
        cmd = [*cmd, "--summary-json", str(summary)]
    log = log or summary
    assert log is not None, "name a log file"
    proc = _finish(_start(cmd, log), log)
    assert proc.returncode == expect_rc, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    )
    return proc


def _steps(summary: Path) -> dict[int, dict]:
    return {s["iteration"]: s for s in json.loads(summary.read_text())["step_metrics"]}


def _assert_exact(resumed: dict[int, dict], reference: dict[int, dict]) -> None:
    assert resumed, "the resumed run ran no step"
    for it, step in resumed.items():
        for key in METRICS:
            assert step[key] == reference[it][key], (it, key, step[key], reference[it][key])


def _latest(save: Path) -> str:
    return (save / "latest").read_text().strip()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Base model, data and a routed import."""
    work = tmp_path_factory.mktemp("train_resume")
    py = sys.executable
    env = subprocess_env()
    for cmd in (
        [py, str(REPO / "examples/quickstart/make_base_model.py"), "--out", str(work), "--steps",
         "5", "--layers", "4", "--hidden-size", "64", "--vocab-size", "600"],
        [py, str(REPO / "tools/preprocess_data.py"), "--input", str(work / "corpus/train.jsonl"),
         "--output-prefix", str(work / "data/stdlib"), "--tokenizer-type",
         "HuggingFaceTokenizer", "--tokenizer-model", str(work / "base"), "--append-eod",
         "--workers", "1", "--no-progress"],
        [py, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(work / "base"),
         "--out-dir", str(work / "ckpt"), "--mod-routed-layers", "all", "--mod-threshold", "0.5",
         "--mod-router-init-bias", "0", "--mod-router-init-std", "2.0"],
    ):  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted single-process run, keeping the newest two checkpoints."""
    flags = ["--keep-last", "2", "--tensorboard-dir", str(work / "tb")]
    _run(_command(work, "ref", flags=flags), work / "ref.json")
    return _steps(work / "ref.json")


def test_reference_keeps_the_newest_checkpoints(work, reference):
    save = work / "ref"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert _latest(save) == "iter_0000006"
    state = json.loads((save / "iter_0000006" / "train_state.json").read_text())
    assert state["iteration"] == 6 and state["consumed_samples"] == 6 * 8
    assert state["scheduler"]["num_steps"] == 6
    assert state["controller"]["step"] == 6 and state["controller"]["target"] == 0.35
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert not any(s["skipped"] for s in reference.values())


def test_tensorboard_has_every_scalar(work, reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "lm loss", "mod/load loss", "mod/c_eff", "grad-norm", "learning-rate", "skipped",
        "consumed-samples", "throughput/step time (s)", "throughput/tokens per s",
        "throughput/computed tokens per s", "validation/lm loss", "validation/ppl",
        "validation/c_eff",
    }  # fmt: skip
    for layer in range(4):
        for name in ("kept_fraction", "mean_gate", "load_loss"):
            expected.add(f"mod/{name}/layer_{layer:02d}")
    assert expected <= tags, expected - tags
    loss = events.Scalars("lm loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx([reference[i]["lm_loss"] for i in reference])


def test_kill_mid_save_and_after_a_checkpoint_then_same_command_resumes_exactly(work, reference):
    save = work / "killed"
    cmd = _command(work, save.name)
    # 1. SIGKILL after iteration 4's files are written, before the rename and `latest`.
    fault = ["--fault", "kill-mid-save", "--fault-iter", "4", "--"]
    _run(
        _command(work, save.name, script=FAULTS, fault=fault),
        expect_rc=-signal.SIGKILL,
        log=work / "killed_1.log",
    )
    assert _latest(save) == "iter_0000002"
    assert (save / ".tmp_iter_0000004").is_dir() and not (save / "iter_0000004").exists()

    # 2. The same command resumes from iteration 2 and is killed -9 right after checkpoint 4.
    log = work / "killed_2.log"
    proc = _start(cmd, log)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if "(iteration 4)" in log.with_suffix(".out").read_text():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        out = _finish(proc, log).stdout
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert "removed what an interrupted save left" in out and ".tmp_iter_0000004" in out
    assert f"resuming from {save / 'iter_0000002'}: iteration 2/{STEPS}" in out
    assert f"iteration     3/{STEPS} | lm loss {reference[3]['lm_loss']:.4f}" in out
    done = int(_latest(save).removeprefix("iter_"))
    assert 4 <= done < STEPS and not (save / ".tmp_iter_0000004").exists()

    # 3. Once more: it continues from the newest checkpoint, exactly as if never interrupted,
    # also with full activation recomputation (memory settings may change on resume).
    recompute = ["--recompute-granularity", "full", "--recompute-method", "uniform"]
    recompute += ["--recompute-num-layers", "1"]
    out = _run([*cmd, *recompute], work / "killed.json").stdout
    assert "recompute full" in out
    assert f"resuming from {save / f'iter_{done:07d}'}: iteration {done}/{STEPS}" in out
    resumed = _steps(work / "killed.json")
    assert sorted(resumed) == list(range(done + 1, STEPS + 1))
    _assert_exact(resumed, reference)


def test_sigterm_saves_exits_zero_and_resumes_exactly(work, reference):
    fault = ["--fault", "sigterm", "--fault-iter", "3", "--"]
    flags = ["--exit-signal-handler"]
    out = _run(
        _command(work, "term", flags=flags, script=FAULTS, fault=fault), work / "term1.json"
    ).stdout
    assert "exiting after iteration 3 (SIGTERM)" in out
    save = work / "term"
    assert _latest(save) == "iter_0000003"
    first = json.loads((work / "term1.json").read_text())
    assert first["exited_early"] and first["last_iteration"] == 3
    _assert_exact(_steps(work / "term1.json"), reference)

    _run(_command(work, "term", flags=flags), work / "term2.json")
    resumed = _steps(work / "term2.json")
    assert sorted(resumed) == [4, 5, 6]
    _assert_exact(resumed, reference)


def test_resume_with_dropout_restores_every_rng_stream(work, reference):
    """With dropout every step draws from the RNGs (torch's and megatron's tracker): a resume
    that did not restore them would continue with other masks and log other losses."""
    flags = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--exit-signal-handler"]
    _run(_command(work, "drop_ref", flags=flags), work / "drop_ref.json")
    dropped = _steps(work / "drop_ref.json")
    assert dropped[2]["lm_loss"] != reference[2]["lm_loss"]  # dropout is on
    fault = ["--fault", "sigterm", "--fault-iter", "3", "--"]
    _run(_command(work, "drop", flags=flags, script=FAULTS, fault=fault), work / "drop1.json")
    _run(_command(work, "drop", flags=flags), work / "drop2.json")
    resumed = _steps(work / "drop2.json")
    assert sorted(resumed) == [4, 5, 6]
    _assert_exact(resumed, dropped)


def test_nan_stop_names_the_iteration(work):
    fault = ["--fault", "nan", "--fault-iter", "2", "--"]
    proc = _run(
        _command(work, "nan_stop", script=FAULTS, fault=fault, flags=["--on-nan", "stop"]),
        expect_rc=3,
        log=work / "nan_stop.log",
    )
    assert "iteration 2: non-finite lm loss" in proc.stderr
    assert not (work / "nan_stop" / "latest").exists()  # stopped before any checkpoint


def test_exit_duration_saves_and_exits_zero(work):
    out = _run(
        _command(work, "duration", flags=["--exit-duration-in-mins", "0.0001"]),
        work / "duration.json",
    ).stdout
    assert "exiting after iteration 1 (--exit-duration-in-mins)" in out
    assert _latest(work / "duration") == "iter_0000001"
    assert json.loads((work / "duration.json").read_text())["exited_early"]


def test_nan_on_one_rank_is_skipped_on_every_rank(work, reference):
    """DP 2, NaN in rank 1's loss only: every rank skips iteration 2's update, nothing else."""
    fault = ["--fault", "nan", "--fault-iter", "2", "--fault-rank", "1", "--"]
    out = _run(
        _command(work, "nan_dp2", nproc=2, flags=["--on-nan", "skip"], script=FAULTS, fault=fault),
        work / "nan_dp2.json",
    ).stdout
    steps = _steps(work / "nan_dp2.json")  # written by rank 0
    assert "skipped (non-finite)" in out
    assert [it for it, s in steps.items() if s["skipped"]] == [2]
    assert math.isnan(steps[2]["lm_loss"]) and math.isnan(steps[2]["grad_norm"])
    assert json.loads((work / "nan_dp2.json").read_text())["skipped_iterations"] == 1
    # Step 1 is the single-process run's (DP 2 reproduces it); the skipped update left weights,
    # moments and schedule as after step 1: the LR does not advance, and later steps stay finite.
    assert steps[1]["lm_loss"] == pytest.approx(reference[1]["lm_loss"], rel=1e-5)
    assert steps[3]["lr"] == pytest.approx(reference[2]["lr"], rel=1e-6)
    assert all(math.isfinite(steps[it]["lm_loss"]) for it in (3, 4, 5, 6))


def test_routers_only_training_changes_only_the_routers(work, mcore):
    from megatron_mod.checkpointing import load_model_checkpoint

    flags = ["--mod-train-routers-only", "--mod-router-lr-mult", "10", "--train-iters", "2"]
    out = _run(_command(work, "routers_only", flags=flags), work / "routers_only.json").stdout
    assert " iteration     2/2 | " in out and "lr 1.00e-02" in out  # 10 x --lr after warmup
    before = dict(load_model_checkpoint(work / "ckpt")[0].named_parameters())
    changed = {
        name
        for name, param in load_model_checkpoint(work / "routers_only")[0].named_parameters()
        if not param.detach().equal(before[name].detach())
    }
    assert changed and all(".router." in name for name in changed), sorted(changed)


def test_changed_meaning_is_refused_before_any_heavy_work(work, reference):
    start = time.perf_counter()
    proc = _run(
        _command(work, "ref", flags=["--lr", "2e-3"]), expect_rc=2, log=work / "refused.log"
    )
    assert "--lr: saved 0.001, now 0.002" in proc.stderr
    assert "loaded" not in proc.stdout  # refused before the model or the data were built
    assert time.perf_counter() - start < 60
    assert _latest(work / "ref") == "iter_0000006"


# ------------------------------------------------------------------------------ torchrun

LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    # bf16 weights with fp32 routers: one optimizer param group mixes both dtypes.
    "dp2_distributed_optimizer_bf16": ["--use-distributed-optimizer", "--bf16"],
}


@pytest.fixture(scope="module")
def full_runs(work):
    """Uninterrupted torchrun runs, one per layout, made on first use."""
    done = {}

    def get(layout: str) -> dict[int, dict]:
        if layout not in done:
            cmd = _command(work, f"full_{layout}", nproc=2, flags=LAYOUTS[layout])
            _run(cmd, work / f"{layout}_full.json")
            done[layout] = _steps(work / f"{layout}_full.json")
        return done[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torchrun_resume_is_exact(work, layout, full_runs):
    flags = LAYOUTS[layout]
    full = full_runs(layout)
    save = work / f"run_{layout}"
    if layout == "dp2_distributed_optimizer_bf16":
        # Every rank is killed -9 in the middle of saving iteration 4 (its shard is written,
        # nothing renamed): the job dies and the same command is launched again.
        fault = ["--fault", "kill-mid-save", "--fault-iter", "4", "--"]
        cmd = _command(work, save.name, nproc=2, flags=flags, script=FAULTS, fault=fault)
        proc = _finish(_start(cmd, work / f"{layout}_killed.log"), work / f"{layout}_killed.log")
        assert proc.returncode != 0
        assert _latest(save) == "iter_0000002" and (save / ".tmp_iter_0000004").is_dir()
    else:
        # Back to iteration 2 of the finished run, as if the job had died after saving it.
        shutil.copytree(work / f"full_{layout}", save)
        (save / "latest").write_text("iter_0000002\n")
        for it in (4, 6):
            shutil.rmtree(save / f"iter_{it:07d}")
    out = _run(_command(work, save.name, nproc=2, flags=flags), work / f"{layout}_resumed.json")
    assert f"resuming from {save / 'iter_0000002'}" in out.stdout
    resumed = _steps(work / f"{layout}_resumed.json")
    assert sorted(resumed) == [3, 4, 5, 6]
    _assert_exact(resumed, full)


RELAYOUTS = {
    # saved by -> resumed under
    "single_to_tp2": ("ref", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2_to_pp2": ("full_dp2", ["--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("case", list(RELAYOUTS))
def test_resume_under_another_layout(work, reference, full_runs, case):
    """Iteration 4 of one layout's run continues under another within fp32 tolerance."""
    source, flags = RELAYOUTS[case]
    expected = reference if source == "ref" else full_runs("dp2")
    save = work / f"relayout_{case}"
    shutil.copytree(work / source, save)
    (save / "latest").write_text("iter_0000004\n")
    shutil.rmtree(save / "iter_0000006")
    out = _run(_command(work, save.name, nproc=2, flags=flags), work / f"{case}.json").stdout
    assert f"resuming from {save / 'iter_0000004'}" in out
    resumed = _steps(work / f"{case}.json")
    assert sorted(resumed) == [5, 6]
    for it, step in resumed.items():
        assert step["lm_loss"] == pytest.approx(expected[it]["lm_loss"], rel=1e-5)
        assert step["load_loss"] == pytest.approx(expected[it]["load_loss"], rel=1e-5)
        assert step["grad_norm"] == pytest.approx(expected[it]["grad_norm"], rel=1e-4)
        assert step["lr"] == pytest.approx(expected[it]["lr"], rel=1e-6)
        assert step["kept_fraction"] == pytest.approx(expected[it]["kept_fraction"], abs=1e-6)


# ------------------------------------------------------------------------------ evaluation

EVAL = [sys.executable, str(REPO / "tools" / "evaluate_mod.py")]


def _evaluate(work: Path, name: str, flags=(), nproc: int = 1) -> dict:
    launcher = [*python_launcher(nproc), *EVAL[1:]]
    out = work / f"{name}.json"
    _run(
        [
            *launcher,
            "--load",
            str(work / "ref"),
            "--data-path",
            "1.0",
            str(work / "data" / "stdlib_text_document"),
            "--split",
            "95,5,0",
            "--seq-length",
            "64",
            "--micro-batch-size",
            "2",
            "--eval-iters",
            "4",
            "--json-out",
            str(out),
            *flags,
        ],  # fmt: skip
        log=work / f"{name}.log",
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def evaluated(work, reference) -> dict:
    """tools/evaluate_mod.py on the reference run's final checkpoint, in one process."""
    return _evaluate(work, "eval")


def test_evaluate_reproduces_the_trainers_validation(work, evaluated):
    """tools/evaluate_mod.py on the final checkpoint = the trainer's last validation (the
    same 8 held-out samples), and a higher threshold keeps fewer tokens at a higher loss."""
    trained = json.loads((work / "ref.json").read_text())
    got = evaluated
    assert got["checkpoint"].endswith("iter_0000006") and got["samples"] == 8
    assert got["lm_loss"] == trained["valid_lm_loss_after"]
    assert got["perplexity"] == pytest.approx(math.exp(got["lm_loss"]))
    assert got["c_eff"] == trained["c_eff_after"]
    assert {int(k): v for k, v in got["kept_fraction"].items()} == {
        int(k): v for k, v in trained["kept_fraction_after"].items()
    }
    # One threshold above every layer's trained one keeps fewer tokens in every layer.
    trained_p = list(got["mod"]["layer_thresholds"].values()) or [got["mod"]["threshold"]]
    p = round(max(trained_p) + (1.0 - max(trained_p)) / 2, 6)
    strict = _evaluate(work, "eval_strict", ["--mod-threshold", str(p)])
    assert strict["mod"]["threshold"] == p and strict["mod"]["layer_thresholds"] == {}
    assert strict["c_eff"] < got["c_eff"] and strict["lm_loss"] > got["lm_loss"]


def test_evaluate_under_pipeline_parallel(work, evaluated):
    single = evaluated
    got = _evaluate(work, "eval_pp2", ["--pipeline-model-parallel-size", "2"], nproc=2)
    assert got["layout"]["pipeline_model_parallel_size"] == 2
    assert got["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-5)
    assert got["kept_fraction"] == pytest.approx(single["kept_fraction"], abs=1e-6)
