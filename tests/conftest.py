"""Shared pytest fixtures: one single-rank megatron-core setup per test session."""

import os
import warnings

import pytest

# megatron-core warns at import about missing Apex/TE on CPU hosts; that is expected here.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def mcore():
    """Initialise torch.distributed (1 rank, gloo on CPU) and megatron parallel state once."""
    from megatron_mod import platform

    platform.initialize(tp=1, pp=1, seed=1234)
    yield
    platform.destroy()


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, restoring the previous count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device_guard(mcore):
    """Fail where a GPU run would see a host tensor (see megatron_mod.device_guard)."""
    from megatron_mod import device_guard

    with device_guard.enabled():
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skip them on CPU-only hosts."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    """Which torch, megatron-core and transformers the suite runs against (and from where)."""
    import torch
    import transformers

    try:
        import megatron.core
    except ImportError:  # the serving environment (vLLM) has no megatron-core
        core = "megatron-core not installed"
    else:
        core_dir = os.path.dirname(os.path.dirname(megatron.core.__file__))
        core = f"megatron-core {megatron.core.__version__} ({core_dir})"
    return f"torch {torch.__version__}, {core}, transformers {transformers.__version__}"
