"""megatron-mod: Mixture-of-Depths continued pretraining for LLaMA models on megatron-core."""

import os as _os
import sys as _sys
import warnings as _warnings

# Progress bars belong on a terminal: written to a log file (a batch job, CI) every redraw of
# transformers' "Loading weights" / "Writing model shards" bars becomes a line. Notebooks keep
# theirs; an explicit HF_HUB_DISABLE_PROGRESS_BARS wins. Read when transformers is imported.
if not _sys.stderr.isatty() and "ipykernel" not in _sys.modules:
    _os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# On hosts without Apex/Transformer Engine megatron-core warns at import time that it falls back
# to torch implementations; megatron-mod supports that fallback, so the warning is noise here.
_warnings.filterwarnings("ignore", message=r".*(Apex is|Apex are) not installed.*")
# Deprecations inside megatron-core and torch's checkpoint code, raised on every conversion and
# training run; nothing a user of megatron-mod can act on.
for _message, _category in (
    (r"full scope is deprecated", UserWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),
):
    _warnings.filterwarnings("ignore", message=_message, category=_category)

__version__ = "0.1.0"
