"""ShortGPT-style layer removal (megatron_mod.hf.prune, tools/prune_layers.py) at tiny size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.subprocess_utils import REPO
from tests.helpers.tiny_llama import make_tiny_hf_llama_with_text

sys.path.insert(0, str(REPO / "tools"))

import prune_layers  # noqa: E402

from megatron_mod.hf.prune import (  # noqa: E402
    PruneError,
    block_influence,
    choose_layers,
    write_pruned_dir,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny tied-embedding LLaMA (6 layers) with a BPE tokenizer, and held-out text."""
    root = tmp_path_factory.mktemp("prune")
    return make_tiny_hf_llama_with_text(root, lambda i: 8.0, "heldout.jsonl")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _windows(tok, data, n=3, seq=48):
    from megatron_mod.hf.prune import load_text_windows

    return load_text_windows(data, tok, seq, n)


def test_scores_equal_cosine_of_reported_hidden_states(tiny_dir):
    """Hook-captured scores equal 1 - mean cos computed from transformers' hidden_states."""
    model_dir, data, tok = tiny_dir
    model = _load(model_dir)
    windows = _windows(tok, data)
    scores = block_influence(model, windows, batch_size=2)
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states
    # hidden_states[i] is layer i's input for i < L; the last entry is after the final norm, so
    # the reference covers every layer but the last.
    for i in range(len(scores) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert scores[i] == pytest.approx(1.0 - float(cos.mean()), abs=1e-6), i
    assert all(0.0 < s < 2.0 for s in scores)


def test_identity_layer_scores_zero_and_goes_first(tiny_dir, tmp_path):
    """A layer whose residual writes are zero does nothing: score 0, removed first."""
    from safetensors.torch import load_file, save_file

    model_dir, data, tok = tiny_dir
    src = tmp_path / "src"
    write_pruned_dir(model_dir, list(range(6)), src)  # a full copy to edit
    tensors = load_file(src / "model.safetensors")
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        tensors[f"model.layers.4.{name}"].zero_()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    scores = block_influence(_load(src), _windows(tok, data))
    assert abs(scores[4]) < 1e-9
    assert min(scores[i] for i in range(6) if i != 4) > 1e-3
    kept, removed = choose_layers(scores, 5 / 6)
    assert removed == [4] and kept == [0, 1, 2, 3, 5]


def test_choose_layers_counts_and_ties():
    scores = [0.5, 0.1, 0.1, 0.9, 0.2, 0.3, 0.05, 0.4]
    kept, removed = choose_layers(scores, 0.75)  # 6 of 8 kept
    assert removed == [2, 6] and len(kept) == 6  # tie 0.1 at layers 1, 2: the later goes
    assert choose_layers(scores, 0.5)[1] == [1, 2, 4, 6]
    assert len(choose_layers([0.1] * 30, 0.75)[0]) == 23  # 22.5 rounds up: 0.767, not 0.733
    assert choose_layers(scores, 1.0)[1] == []
    assert choose_layers(scores, 0.01)[0] == [3]  # at least one layer stays
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(PruneError, match="keep-compute"):
            choose_layers(scores, bad)


def test_cli_writes_loadable_pruned_model_equal_to_skipping(tiny_dir, tmp_path, capsys):
    """Pruned dir loads in transformers, stays tied, keeps the tokenizer, and its logits equal
    the original model run with the removed layers skipped; scores are reproducible."""
    from transformers import AutoTokenizer

    model_dir, data, tok = tiny_dir
    out = tmp_path / "pruned"
    argv = ["--model", str(model_dir), "--data", str(data), "--keep-compute", "0.6",
            "--seq-length", "48", "--num-sequences", "3", "--out", str(out)]  # fmt: skip
    assert prune_layers.main([*argv, "--plan-json", str(tmp_path / "plan.json")]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["removed"]) == 2 and plan["c_eff"] == pytest.approx(4 / 6)  # 3.6 -> 4 kept
    assert "c_eff 0.6667" in printed
    ranked = sorted(range(6), key=lambda i: plan["scores"][i])
    assert sorted(ranked[:2]) == plan["removed"]

    # Same inputs, same scores and choice (bit for bit).
    assert prune_layers.main([*argv, "--overwrite", "--plan-json", str(tmp_path / "p2.json")]) == 0
    assert json.loads((tmp_path / "p2.json").read_text()) == plan

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["tie_word_embeddings"] is True
    assert set(config) == set(json.loads((model_dir / "config.json").read_text()))
    assert json.loads((out / "pruning.json").read_text())["removed"] == plan["removed"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    pruned = _load(out)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert AutoTokenizer.from_pretrained(out)("def f():").input_ids == tok("def f():").input_ids

    # Reference: the original model with the removed layers turned into identities by hooks.
    original = _load(model_dir)

    def skip(_module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    for i in plan["removed"]:
        original.model.layers[i].register_forward_hook(skip, with_kwargs=True)
    ids = _windows(tok, data, n=2, seq=40)
    with torch.no_grad():
        ref, got = original(ids).logits, pruned(ids).logits
        full = _load(model_dir)(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got - full).abs().max() > 1e-2  # the removal really changed the model
    # Kept layers' weights are the source's, renumbered.
    j = plan["kept"][-1]
    assert torch.equal(pruned.model.layers[3].mlp.up_proj.weight, full_weight(model_dir, j))


def full_weight(model_dir, layer):
    from safetensors.torch import load_file

    return load_file(Path(model_dir) / "model.safetensors")[
        f"model.layers.{layer}.mlp.up_proj.weight"
    ]


def test_bad_inputs_are_named(tiny_dir, tmp_path, capsys):
    model_dir, data, _ = tiny_dir
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["--model", str(model_dir), "--data", str(data), "--out", str(out)]
    assert prune_layers.main([*base, "--keep-compute", "0.5"]) == 2
    assert "--out" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert prune_layers.main([*base, "--keep-compute", "0", "--overwrite"]) == 2
    assert "keep-compute" in capsys.readouterr().err
    missing = ["--model", str(model_dir), "--data", str(tmp_path / "none.jsonl")]
    assert prune_layers.main([*missing, "--keep-compute", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PruneError, match="safe_serialization"):
        write_pruned_dir(pickled, [0], tmp_path / "y")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    assert prune_layers.main([*missing[:2], "--data", str(bad_json), "--keep-compute", "0.5",
                              "--out", str(tmp_path / "z")]) == 2  # fmt: skip
    assert "bad.jsonl:2" in capsys.readouterr().err
