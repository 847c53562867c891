"""Unlearning losses: O(tokens) heads over the fused token log-likelihood ops.

Every public loss accepts logits [..., V], or hidden states [..., H] with ``lm_head=`` [V, H].
"""
from fastweight.losses._input import token_logprobs
from fastweight.losses.reweighted import ga_loss, satimp_loss, simimp_loss, wga_loss

__all__ = ["ga_loss", "satimp_loss", "simimp_loss", "token_logprobs", "wga_loss"]
