"""Multi-rank parity (torchrun, gloo): every TP/PP/SP layout computes what TP=1 computes.

Routing is active (p = 0.5, routers that keep roughly half of the tokens), the weights come from
one torch_dist checkpoint resharded on load, and one step runs through megatron-core's pipeline
schedule with 2 micro-batches and the load-reducing loss attached.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.subprocess_utils import DISTRIBUTED_SCRIPTS, run_script

SCRIPT = DISTRIBUTED_SCRIPTS / "mod_parallel_parity.py"


def _run(args: list[str], nproc: int = 1) -> None:
    run_script(SCRIPT, args, nproc=nproc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt = root / "ckpt"
    _run(["--save", str(ckpt)])
    out = root / "tp1.json"
    _run(["--load", str(ckpt), "--out", str(out)])
    return ckpt, json.loads(out.read_text())


LAYOUTS = {
    "tp2": (["--tp", "2"], 2),
    "pp2": (["--pp", "2"], 2),
    "tp2_sp": (["--tp", "2", "--sp"], 2),
    "tp2_pp2_sp": (["--tp", "2", "--pp", "2", "--sp"], 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_tp1(reference, layout, tmp_path):
    ckpt, ref = reference
    flags, nproc = LAYOUTS[layout]
    out = tmp_path / f"{layout}.json"
    _run(["--load", str(ckpt), "--out", str(out), *flags], nproc=nproc)
    _assert_parity(json.loads(out.read_text()), ref, nproc)


@pytest.mark.slow
def test_skipped_kv_tp2_pp2_sp_matches_tp1(reference, tmp_path):
    """Keys and values from every token (--mod-skipped-kv): TP heads, PP stages and the SP
    gather inside the QKV projection give what one rank computes."""
    ckpt, dense_kv_ref = reference
    ref_path, got_path = tmp_path / "tp1.json", tmp_path / "tp2_pp2_sp.json"
    _run(["--load", str(ckpt), "--out", str(ref_path), "--skipped-kv"])
    flags, nproc = LAYOUTS["tp2_pp2_sp"]
    _run(["--load", str(ckpt), "--out", str(got_path), "--skipped-kv", *flags], nproc=nproc)
    ref = json.loads(ref_path.read_text())
    _assert_parity(json.loads(got_path.read_text()), ref, nproc)
    # Same weights and routing inputs at layer 0; attending to the skipped tokens changes the loss.
    assert ref["lm_loss"] != pytest.approx(dense_kv_ref["lm_loss"], rel=1e-4)


def _assert_parity(got: dict, ref: dict, nproc: int) -> None:
    assert got["world_size"] == nproc
    kept = [ref["kept_fraction"][str(i)] for i in range(4)]
    assert any(0.2 < f < 0.8 for f in kept), f"routing should be active: {kept}"
    assert got["kept_fraction"] == ref["kept_fraction"]
    assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-5)
    assert got["load_loss"] == pytest.approx(ref["load_loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["router_bias_grad"] == pytest.approx(ref["router_bias_grad"], rel=1e-4, abs=1e-9)
    assert got["router_weight_grad_norm"] == pytest.approx(ref["router_weight_grad_norm"], rel=1e-4)
    assert all(abs(g) > 0 for g in ref["router_bias_grad"])


@pytest.mark.slow
def test_sequence_parallel_traffic_scales_with_the_kept_fraction(tmp_path):
    """Under SP a routed layer moves ~c of a dense layer's data, not s + 5*s_c token rows."""
    out = tmp_path / "traffic.json"
    seq = 512
    run_script(
        DISTRIBUTED_SCRIPTS / "sp_traffic.py",
        ["--out", str(out), "--seq", str(seq), "--multiple", "2", "--capacities", "0.25,0.5"],
        nproc=2,
    )
    rows = json.loads(out.read_text())["rows"]
    dense = rows["dense"]["forward_token_rows_max"]
    assert dense == 4 * seq / 2  # two all-gathers and two reduce-scatters of s/tp rows each
    for c in (0.25, 0.5):
        mod = rows[f"c={c}"]
        compact = c * seq
        gather_everything = (seq + 5 * compact) / 2  # all-gather of the full sequence design
        assert mod["forward_token_rows_max"] <= c * dense + 0.1 * compact, (c, mod)
        assert mod["forward_token_rows_max"] < 0.7 * gather_everything, (c, mod)
        assert (
            mod["total_token_rows_max"] <= c * rows["dense"]["total_token_rows_max"] + 0.1 * compact
        )
