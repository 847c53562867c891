"""Naive reference for ``fastweight.losses.rmu`` (``shared/spec/LOSSES.md``, RMU):
``L = MSE(h_f, c u) + alpha * MSE(h_r, h_r^ref)``, MSE averaged over the features of the counted positions."""
from __future__ import annotations


def _mse(h, target, mask):
    sq = (h - target) ** 2
    if mask is None:
        return sq.mean()
    m = mask.bool()
    return sq[m].sum() / (m.sum() * h.shape[-1])

def rmu_loss(forget_hidden, control, retain_hidden=None, ref_retain_hidden=None, *, alpha=1200.0,
             forget_mask=None, retain_mask=None):
    loss = _mse(forget_hidden, control.detach(), forget_mask)
    if retain_hidden is not None:
        loss = loss + alpha * _mse(retain_hidden, ref_retain_hidden.detach(), retain_mask)
    return loss
