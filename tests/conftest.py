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


def pytest_report_header(config):
    """Which torch, megatron-core and transformers the suite runs against (and from where)."""
    import megatron.core
    import torch
    import transformers

    core_dir = os.path.dirname(os.path.dirname(megatron.core.__file__))
    return (
        f"torch {torch.__version__}, megatron-core {megatron.core.__version__} "
        f"({core_dir}), transformers {transformers.__version__}"
    )
