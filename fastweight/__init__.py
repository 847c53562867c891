"""fastweight: fused, memory-lean loss kernels for LLM unlearning.

Public API::

    from fastweight import token_logprobs, satimp_loss, wga_loss, simimp_loss, ga_loss

Every loss takes logits [..., V] (or hidden states [..., H] with ``lm_head=``) and labels [...].
"""
from fastweight import losses as _losses
from fastweight._constants import IGNORE_INDEX
from fastweight.losses import *  # noqa: F401,F403  (the loss functions; ``fastweight.losses.__all__``)
from fastweight.integrations.transformers import patch, unpatch  # Hugging Face causal LMs, fused loss

__version__ = "0.1.0"

__all__ = ["IGNORE_INDEX", "__version__", "patch", "unpatch", *_losses.__all__]
