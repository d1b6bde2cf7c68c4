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
