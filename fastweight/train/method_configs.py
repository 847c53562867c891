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
class NPOConfig(BetaConfig):
    """empty_rows: "drop" (mean over rows with an answer token) or "keep" (mean over every row, a row without
    one contributing (2/beta) log 2, as open-unlearning's ``compute_dpo_loss``)."""

    empty_rows: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("empty_rows", self.empty_rows, ("drop", "keep"))


@dataclass
class UNDIALConfig(BetaConfig):
    """form: "kl" reports KL(q || p), "ce" the soft-label cross-entropy (open-unlearning's value)."""

    form: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("form", self.form, ("kl", "ce"))


@dataclass
class CEUConfig(MethodConfig):
    ignore_first_n: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("ignore_first_n", self.ignore_first_n, low=0)


@dataclass
class PDUConfig(MethodConfig):
    """retain_eps: the retain loss is shifted by -eps; primal_dual: after each call the retain weight becomes
    max(0, weight + dual_step_size * (retain - eps)) (open-unlearning's per-step dual update)."""

    retain_eps: float
    primal_dual: bool
    dual_step_size: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("retain_eps", self.retain_eps)
        check_number("dual_step_size", self.dual_step_size, low=0.0)
        if not isinstance(self.primal_dual, bool):
            raise ValueError(f"primal_dual must be a bool, got {self.primal_dual!r}")
        if self.retain_loss == "none":
            raise ValueError("PDU needs a retain term: retain_loss must be 'nll' or 'kl'")


RMU_CONVENTIONS = ("wmdp", "open_unlearning")


@dataclass
class RMUConfig:
    """alpha: retain MSE weight; steering_coef: c; layer: decoder layer whose output is steered;
    trainable_layers / param_keys: only parameters of those layers whose name contains a key are trained;
    seed: of the random direction u; mask_padding: average the MSEs over attention-mask positions only.
    convention: "wmdp" (the above) or "open_unlearning" (their ``src/trainer/unlearn/rmu.py``, commit d3d7cf9):
    positions with ``labels != -100`` (unshifted) count, each MSE is their per-sequence average as their code
    computes it (``mean_b(S_b) * mean_b(1 / n_b)``, S_b the sum over counted positions of the mean over H, n_b
    their count: the mean of S_b / n_b when the counts are equal; ``methods._per_sequence_mse``), the loss is
    ``gamma * forget + alpha * retain``, the control vector is ``torch.rand(1, 1, H)`` from the *global* RNG
    at the first call (normalised, times steering_coef; ``seed`` unused), and the trained parameters are
    those whose name fully matches one of ``trainable_regex`` (``layer``'s trainable_layers/param_keys
    unused). gamma / trainable_regex are only read under that convention."""

    alpha: float
    steering_coef: float
    layer: int
    trainable_layers: tuple[int, ...]
    param_keys: tuple[str, ...]
    seed: int
    mask_padding: bool
    convention: str
    gamma: float
    trainable_regex: tuple[str, ...]

    def __post_init__(self) -> None:
        check_choice("convention", self.convention, RMU_CONVENTIONS)
        check_number("gamma", self.gamma, low=0.0)
        self.trainable_regex = (self.trainable_regex,) if isinstance(self.trainable_regex, str) else \
            tuple(self.trainable_regex)
        if not all(isinstance(k, str) and k for k in self.trainable_regex):
            raise ValueError(f"trainable_regex must be non-empty regex strings, got {self.trainable_regex!r}")
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


__all__ = ["BetaConfig", "CEUConfig", "FLATConfig", "HardSamplingConfig", "MethodConfig", "NPOConfig", "PDUConfig",
           "RMUConfig", "RMU_CONVENTIONS", "SatImpConfig", "SimNPOConfig", "UNDIALConfig", "WTNPOConfig"]


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
