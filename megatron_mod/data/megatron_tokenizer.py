"""The tokenizer object megatron-core's datasets expect, wrapping a :class:`TextTokenizer`.

``GPTDatasetConfig.tokenizer`` reads ``eod``, ``pad``, ``eos``, ``vocab_size`` and
``unique_identifiers`` (folded into the dataset cache hash). megatron-core >= 0.14 types it as
``megatron.core.tokenizers.MegatronTokenizerBase``; older releases as
``megatron.core.datasets.megatron_tokenizer.MegatronTokenizer``. This module is the one place
that knows the difference: the adapter derives from whichever base the installed version has.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from megatron_mod.data.tokenizers import TextTokenizer

__all__ = ["MegatronTokenizerAdapter", "megatron_tokenizer"]

try:  # megatron-core >= 0.14 (0.16 ... 0.19)
    from megatron.core.tokenizers import MegatronTokenizerBase as _Base

    _NEW_API = True
except ImportError:  # pragma: no cover - older megatron-core
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _Base

    _NEW_API = False


class MegatronTokenizerAdapter(_Base):
    """A megatron-core tokenizer backed by a :class:`TextTokenizer`."""

    def __init__(self, tokenizer: TextTokenizer):
        # Neither base __init__ is called: the new one only copies a config dict onto the object
        # and the legacy one logs a deprecation warning; the attributes are set here instead.
        self._tok = tokenizer
        self.path = getattr(tokenizer, "path", "")
        self.unique_identifiers = OrderedDict(
            [("class", tokenizer.name), ("tokenizer_path", [self.path])]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (as the preprocessing tool writes them, without EOD)."""
        return self._tok.encode_batch([text])[0]

    def detokenize(self, ids) -> str:
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()])

    @property
    def vocab(self) -> dict:
        """Not needed by GPT datasets; kept for the abstract interface."""
        raise NotImplementedError("vocab is not exposed by megatron-mod's tokenizer adapter")

    @property
    def inv_vocab(self) -> dict:
        """Not needed by GPT datasets; kept for the abstract interface."""
        raise NotImplementedError("inv_vocab is not exposed by megatron-mod's tokenizer adapter")

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (added tokens included)."""
        return self._tok.vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id."""
        return self._tok.eod

    @property
    def eos(self) -> int:
        """Same as :attr:`eod` for causal LM corpora."""
        return self._tok.eod

    @property
    def pad(self) -> int:
        """Pad id: -1 (none); megatron-core then masks nothing as padding."""
        return -1

    def apply_chat_template(self, *args, **kwargs):
        """Not supported (pretraining corpora only)."""
        raise NotImplementedError("chat templates are not supported")


def megatron_tokenizer(tokenizer_type: str, tokenizer_model: str) -> MegatronTokenizerAdapter:
    """Load a local tokenizer and wrap it for megatron-core datasets.

    Args:
        tokenizer_type: ``HuggingFaceTokenizer`` or ``SentencePieceTokenizer``.
        tokenizer_model: local tokenizer directory or sentencepiece model file.

    Returns:
        The adapter.
    """
    from megatron_mod.data.tokenizers import build_tokenizer

    return MegatronTokenizerAdapter(build_tokenizer(tokenizer_type, tokenizer_model))
