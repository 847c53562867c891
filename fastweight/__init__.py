"""fastweight: fused, memory-lean loss kernels for LLM unlearning.

Public API::

    from fastweight import token_logprobs, satimp_loss, wga_loss, simimp_loss, ga_loss
"""
from fastweight._constants import IGNORE_INDEX
from fastweight.losses import ga_loss, satimp_loss, simimp_loss, wga_loss
from fastweight.ops import token_logprobs

__version__ = "0.1.0"

__all__ = ["IGNORE_INDEX", "ga_loss", "satimp_loss", "simimp_loss", "token_logprobs", "wga_loss", "__version__"]
