"""Method config dataclasses for ``fastweight.train.methods`` (no defaults here: ``build_method`` fills them
from ``fastweight.losses.LOSSES``, the only source of defaults). Each validates its values on construction."""
from __future__ import annotations

from dataclasses import dataclass

from fastweight.losses import DIVERGENCES, GRANULARITIES, RETAIN_LOSSES, SAMPLINGS
from fastweight.losses._seq import check_choice, check_int, check_number


@dataclass
class MethodConfig:
    """forget_coef * forget term + retain_coef * retain term ("none" | "nll" | "kl"; kl_masked: KL mode)."""

    forget_coef: float
    retain_coef: float
    retain_loss: str
    kl_masked: bool

    def __post_init__(self) -> None:
        check_number("forget_coef", self.forget_coef, low=0.0)
        check_number("retain_coef", self.retain_coef, low=0.0)
        check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        if not isinstance(self.kl_masked, bool):
            raise ValueError(f"kl_masked must be a bool, got {self.kl_masked!r}")


@dataclass
class BetaConfig(MethodConfig):
    """WGA (p**beta), SimImp ((1-p)**beta), NPO, TNPO, IdkDPO (beta), UNDIAL (logit shift beta)."""

    beta: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("beta", self.beta, low=0.0)


@dataclass
class SatImpConfig(MethodConfig):
    beta1: float
    beta2: float
    granularity: str
    group_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("beta1", self.beta1, low=0.0)
        check_number("beta2", self.beta2, low=0.0)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("group_size", self.group_size, low=1)


@dataclass
class HardSamplingConfig(MethodConfig):
    k: float
    sampling: str
    seed: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("k", self.k, low=0.0, high=1.0, low_open=True)
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_int("seed", self.seed, low=0)


@dataclass
class SimNPOConfig(BetaConfig):
    gamma: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("gamma", self.gamma)


@dataclass
class WTNPOConfig(BetaConfig):
    alpha: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alpha", self.alpha, low=0.0)


@dataclass
class FLATConfig(MethodConfig):
    divergence: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("divergence", self.divergence, DIVERGENCES)


@dataclass
class RMUConfig:
    """alpha: retain MSE weight; steering_coef: c; layer: decoder layer whose output is steered;
    trainable_layers / param_keys: only parameters of those layers whose name contains a key are trained;
    seed: of the random direction u; mask_padding: average the MSEs over attention-mask positions only."""

    alpha: float
    steering_coef: float
    layer: int
    trainable_layers: tuple[int, ...]
    param_keys: tuple[str, ...]
    seed: int
    mask_padding: bool

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, low=0.0)
        check_number("steering_coef", self.steering_coef, low=0.0)
        check_int("layer", self.layer, low=0)
        self.trainable_layers = tuple(self.trainable_layers)
        if not self.trainable_layers:
            raise ValueError("trainable_layers must name at least one layer")
        for i in self.trainable_layers:
            check_int("trainable_layers[i]", i, low=0)
        self.param_keys = tuple(self.param_keys)
        if not self.param_keys or not all(isinstance(k, str) and k for k in self.param_keys):
            raise ValueError(f"param_keys must be non-empty strings, got {self.param_keys!r}")
        check_int("seed", self.seed, low=0)
        if not isinstance(self.mask_padding, bool):
            raise ValueError(f"mask_padding must be a bool, got {self.mask_padding!r}")


__all__ = ["BetaConfig", "FLATConfig", "HardSamplingConfig", "MethodConfig", "RMUConfig", "SatImpConfig",
           "SimNPOConfig", "WTNPOConfig"]


# Methods as released by the seeds' code (fastweight.losses.released); appended, same conventions.
@dataclass
class NPOHardConfig(HardSamplingConfig):
    beta: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("beta", self.beta, low=0.0, low_open=True)


@dataclass
class KTOConfig(BetaConfig):
    form: str

    def __post_init__(self) -> None:
        super().__post_init__()
        from fastweight.losses import KTO_FORMS
        check_choice("form", self.form, KTO_FORMS)


@dataclass
class LLMUConfig(MethodConfig):
    ga_weight: float
    mismatch_weight: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("ga_weight", self.ga_weight, low=0.0)
        check_number("mismatch_weight", self.mismatch_weight, low=0.0)


__all__ += ["KTOConfig", "LLMUConfig", "NPOHardConfig"]
