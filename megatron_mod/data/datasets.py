"""Train/valid/test GPT datasets from a weighted blend, through megatron-core's builder.

The blend uses Megatron's syntax, ``"w1 prefix1 w2 prefix2 ..."`` (``--data-path``) or a file
holding that string (``--data-args-path``); unweighted prefixes are weighted by their size.
Building works with or without ``torch.distributed``: without it (and without a cache
directory) every index is built in memory in this process; with a cache directory,
megatron-core writes the indices on rank 0 and the others wait at a barrier, so
``torch.distributed`` must then be initialised (``megatron_mod.platform.initialize()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

__all__ = ["build_gpt_datasets", "parse_blend", "read_data_args_file"]


def read_data_args_file(path: str) -> list[str]:
    """The whitespace-separated tokens of a ``--data-args-path`` file."""
    with open(path, encoding="utf-8") as f:
        return f.read().split()


def parse_blend(data_path: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Parse ``w1 p1 w2 p2 ...`` (or ``p1 p2 ...``) into megatron-core's ``(prefixes, weights)``.

    Args:
        data_path: the string or its tokens.

    Returns:
        ``(prefixes, weights)``; ``weights`` is None when no weights were given.

    Raises:
        ValueError: odd token count for a weighted blend, or non-positive weights.
    """
    tokens = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not tokens:
        raise ValueError("empty data path")

    def is_number(s: str) -> bool:
        try:
            float(s)
        except ValueError:
            return False
        return True

    if not is_number(tokens[0]):
        return tokens, None
    if len(tokens) % 2:
        raise ValueError(f"weighted blend needs 'weight prefix' pairs, got {len(tokens)} tokens")
    weights = [float(w) for w in tokens[0::2]]
    if any(w <= 0 for w in weights):
        raise ValueError(f"blend weights must be positive: {weights}")
    return tokens[1::2], weights


def _default_is_built_on_rank() -> bool:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    # As Megatron-LM's pretrain_gpt: only ranks that consume tokens (first/last pipeline stage)
    # build, once per tensor-parallel group.
    return parallel_state.get_tensor_model_parallel_rank() == 0 and (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    )


def build_gpt_datasets(
    data_path: str | Sequence[str],
    tokenizer,
    seq_length: int,
    num_samples: Sequence[int],
    split: str = "969,30,1",
    seed: int = 1234,
    path_to_cache: str | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """Build train/valid/test ``GPTDataset`` blends with ``BlendedMegatronDatasetBuilder``.

    Args:
        data_path: blend string/tokens (see :func:`parse_blend`).
        tokenizer: a :class:`~megatron_mod.data.megatron_tokenizer.MegatronTokenizerAdapter`
            (or any megatron-core tokenizer).
        seq_length: tokens per sample (each sample holds ``seq_length + 1`` tokens).
        num_samples: samples wanted for train, valid and test (0 or None: no dataset).
        split: document split weights, e.g. ``"969,30,1"``.
        seed: shuffling seed.
        path_to_cache: where megatron-core caches the sample indices (None: keep in memory).
        reset_position_ids: restart positions after each EOD.
        reset_attention_mask: block attention across EODs.
        eod_mask_loss: no loss on EOD tokens.
        is_built_on_rank: which ranks build; default as Megatron-LM's ``pretrain_gpt``.

    Returns:
        ``[train, valid, test]`` datasets (None where not built).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    kwargs = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parse_blend(data_path),
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        # The trainer's attention is causal and takes no mask; megatron would otherwise build
        # an s x s fp32 mask per sample (535 ms at seq 8192) only for it to be dropped.
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    # Fields come and go between megatron-core releases; pass only those this one knows.
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    config = GPTDatasetConfig(**{k: v for k, v in kwargs.items() if k in known})
    sizes = [int(n) if n else 0 for n in num_samples]
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or _default_is_built_on_rank, config
    )
    return builder.build()
