"""RMU: representation misdirection (Li et al., 2024, the WMDP paper; spec ``LOSSES.md``, RMU).

On forget data the hidden states of decoder layer l are pushed to a fixed random direction, on retain
data they are held at the frozen reference's:
    L = MSE(h_l(x_f), c * u) + alpha * MSE(h_l(x_r), h_l^ref(x_r))
with u a random unit vector (uniform in [0, 1)^H, then normalised, as the WMDP code) and c the steering
coefficient. Plain tensors in: the caller (``fastweight.train.methods``) captures the layer's output.
Defaults (WMDP release ``rmu/unlearn.py`` with its zephyr-7b command): layer 7 steered, layers 5-7 trained,
``mlp.down_proj`` only (``param_ids=6``), c = 6.5, alpha = 1200 (the registry's ``LOSSES["rmu"]``; the
release's argparse defaults are c = 20, alpha = 100). The release averages its MSEs over padding too; the
registry masks padding by default (``mask_padding``). The G-effect paper uses layer 9,
c = 4 (Phi-1.5) and layer 21, c = 2 (Llama-2-7B) on TOFU.
"""
from __future__ import annotations

import torch

from fastweight.losses._seq import check_int, check_number
from fastweight.ops._common import check_finite as check_finite_tensor
from fastweight.ops._common import check_float_tensor


def rmu_control_vector(hidden_size: int, *, steering_coef: float = 6.5, seed: int = 0,
                       generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """``c * u`` [H]: u uniform in [0, 1)^H from ``generator`` (or a CPU one seeded with ``seed``), normalised."""
    check_int("hidden_size", hidden_size, low=1)
    check_number("steering_coef", steering_coef, low=0.0)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=gen, dtype=torch.float64, device=gen.device)
    return (steering_coef * u / u.norm()).to(dtype=dtype, device=device if device is not None else gen.device)


def _masked_mse(name: str, h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (h - target)**2 over the H features of positions where ``mask`` is true (all when None)."""
    check_float_tensor(name, h, min_dim=1)
    sq = (h.float() - target.float()).pow(2)
    if mask is None:
        return sq.mean()
    if not isinstance(mask, torch.Tensor) or mask.shape != h.shape[:-1]:
        raise ValueError(f"the mask for {name} must be a tensor of shape {tuple(h.shape[:-1])}, "
                         f"got {getattr(mask, 'shape', type(mask).__name__)}")
    m = mask.to(torch.bool)
    return torch.where(m[..., None], sq, 0.0).sum() / (m.sum().clamp(min=1) * h.shape[-1])


def rmu_loss(forget_hidden: torch.Tensor, control: torch.Tensor, retain_hidden: torch.Tensor | None = None,
             ref_retain_hidden: torch.Tensor | None = None, *, alpha: float = 1200.0,
             forget_mask: torch.Tensor | None = None, retain_mask: torch.Tensor | None = None,
             return_terms: bool = False, check_finite: bool = False):
    """``MSE(h_f, control) + alpha * MSE(h_r, sg[h_r^ref])`` (RMU).

    forget_hidden: [B, T, H] (any leading dims) layer-l hidden states on forget data, any float dtype.
    control: [H] steering vector ``c * u`` (``rmu_control_vector``), broadcast over positions; detached.
    retain_hidden, ref_retain_hidden: [B', T', H] layer-l hidden states of the model and of the frozen
        reference on retain data (both or neither; the reference is detached).
    forget_mask / retain_mask: optional [B, T] attention masks: the MSE then averages over valid positions
        (the WMDP code averages over every position, padding included: pass None for that).
    check_finite: raise ValueError on NaN/inf hidden states first (one extra pass).
    Returns a float32 0-d tensor, or ``(total, forget_term, retain_term)`` with ``return_terms``
    (retain_term is 0 without retain data).
    """
    if check_finite:
        for name, t in (("forget_hidden", forget_hidden), ("retain_hidden", retain_hidden),
                        ("ref_retain_hidden", ref_retain_hidden)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                check_finite_tensor(name, t)
    check_number("alpha", alpha, low=0.0)
    check_float_tensor("forget_hidden", forget_hidden, min_dim=2)
    check_float_tensor("control", control, min_dim=1)
    if control.shape != forget_hidden.shape[-1:]:
        raise ValueError(f"control must be [H] with H = {forget_hidden.shape[-1]}, got {tuple(control.shape)}")
    forget_term = _masked_mse("forget_hidden", forget_hidden, control.detach(), forget_mask)
    if (retain_hidden is None) != (ref_retain_hidden is None):
        raise ValueError("retain_hidden and ref_retain_hidden must be given together")
    if retain_hidden is None:
        retain_term = torch.zeros((), dtype=torch.float32, device=forget_hidden.device)
    else:
        check_float_tensor("ref_retain_hidden", ref_retain_hidden, min_dim=2)
        if ref_retain_hidden.shape != retain_hidden.shape:
            raise ValueError(f"ref_retain_hidden shape {tuple(ref_retain_hidden.shape)} must equal retain_hidden "
                             f"shape {tuple(retain_hidden.shape)}")
        retain_term = _masked_mse("retain_hidden", retain_hidden, ref_retain_hidden.detach(), retain_mask)
    total = forget_term + alpha * retain_term
    return (total, forget_term, retain_term) if return_terms else total
