"""Unlearning losses: O(tokens) heads over the fused token log-likelihood ops."""
from fastweight.losses.reweighted import ga_loss, satimp_loss, simimp_loss, wga_loss

__all__ = ["ga_loss", "satimp_loss", "simimp_loss", "wga_loss"]
