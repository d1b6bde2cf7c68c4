"""megatron-mod: Mixture-of-Depths continued pretraining for LLaMA models on megatron-core."""

import warnings as _warnings

# On hosts without Apex/Transformer Engine megatron-core warns at import time that it falls back
# to torch implementations; megatron-mod supports that fallback, so the warning is noise here.
_warnings.filterwarnings("ignore", message=r".*(Apex is|Apex are) not installed.*")

__version__ = "0.1.0"
