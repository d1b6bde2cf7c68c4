"""Text tokenizers used by preprocessing (and wrapped for megatron-core datasets).

Two kinds, named as in Megatron-LM's ``--tokenizer-type``:

* ``HuggingFaceTokenizer``: ``transformers.AutoTokenizer`` from a local directory. By default
  text is encoded as ``tokenizer(text).input_ids``, i.e. with the tokenizer's own special tokens
  (a LLaMA tokenizer adds BOS to every document, LLaMA's pretraining format), as Megatron-LM's
  legacy ``_HuggingFaceTokenizer`` (``megatron.training.tokenizer``) does. With
  ``special_tokens=False`` it is ``tokenizer(text, add_special_tokens=False).input_ids`` (no
  BOS), as Megatron-LM's current default does (``megatron.core.tokenizers``, whose
  ``text_to_ids`` follows ``include_special_tokens``, False unless
  ``--tokenizer-hf-include-special-tokens``; its ``tools/preprocess_data.py`` uses it since core
  0.15 unless ``--legacy-tokenizer`` is given). EOD is ``eos_token_id``; the vocabulary size is
  ``len(tokenizer)`` (added tokens included).
* ``SentencePieceTokenizer``: a sentencepiece ``.model`` file. Text is encoded with
  ``encode(text)`` (no BOS/EOS, like Megatron-LM's ``GPTSentencePieceTokenizer``); EOD is the
  model's ``eos_id``. Megatron-LM's ``SentencePieceTokenizer`` appends extra ``<EOD>``/``<MASK>``
  pieces past the vocabulary for BERT/T5; a GPT corpus does not need them, so they are not added.
  ``special_tokens`` changes nothing here (``encode`` adds none).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["TOKENIZER_TYPES", "TextTokenizer", "build_tokenizer"]

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")


class TextTokenizer:
    """Common interface: batch encode, decode, EOD id, vocabulary size."""

    name: str
    eod: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for each text."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``."""
        raise NotImplementedError


class _HFTokenizer(TextTokenizer):
    def __init__(self, path: str, special_tokens: bool = True):
        from transformers import AutoTokenizer

        self.name = "HuggingFaceTokenizer"
        self.path = path
        self.special_tokens = special_tokens
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has no eos token; it is needed as the EOD token")
        self.eod = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)

    def encode_batch(self, texts):
        if not texts:
            return []
        # One batched call lets the Rust tokenizer skip per-call overhead; results are the same
        # as encoding each text alone.
        enc = self._tok(list(texts), add_special_tokens=self.special_tokens)
        return [list(ids) for ids in enc.input_ids]

    def decode(self, ids):
        return self._tok.decode(list(ids))


class _SPTokenizer(TextTokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm

        self.name = "SentencePieceTokenizer"
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(f"sentencepiece model {path} has no eos piece; it is needed as EOD")
        self.eod = int(eos)
        self.vocab_size = int(self._sp.get_piece_size())

    def encode_batch(self, texts):
        return [list(ids) for ids in self._sp.encode(list(texts))] if texts else []

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str, special_tokens: bool = True
) -> TextTokenizer:
    """Load a tokenizer from local files.

    Args:
        tokenizer_type: ``HuggingFaceTokenizer`` or ``SentencePieceTokenizer``.
        tokenizer_model: a Hugging Face tokenizer directory (or a directory with a
            ``tokenizer.model`` for sentencepiece), or a sentencepiece ``.model`` file.
        special_tokens: let a Hugging Face tokenizer add its special tokens (e.g. LLaMA's BOS);
            False encodes with ``add_special_tokens=False``. No effect on sentencepiece.

    Returns:
        The tokenizer.

    Raises:
        ValueError: for an unknown type.
        FileNotFoundError: if ``tokenizer_model`` does not exist.
    """
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model {tokenizer_model!r} does not exist")
    if tokenizer_type == "HuggingFaceTokenizer":
        return _HFTokenizer(tokenizer_model, special_tokens=special_tokens)
    if tokenizer_type == "SentencePieceTokenizer":
        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        return _SPTokenizer(path)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose from {TOKENIZER_TYPES}")
