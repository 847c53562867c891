"""Analysis tools: G-effect (``g_effect``, ``g_effects``, ``GEffectTracker``, ``maybe_record``) and its plots
(``fastweight.analysis.plots``, matplotlib loaded only there)."""
from fastweight.analysis.g_effect import (
    GROUP_BYS, OBJECTIVE_GRAD, GEffect, GEffectTracker, GroupBy, g_effect, g_effects, maybe_record, merge_groups,
    param_groups, probe_nll, unwrap_model,
)

__all__ = ["GEffect", "GEffectTracker", "GROUP_BYS", "GroupBy", "OBJECTIVE_GRAD", "g_effect", "g_effects",
           "maybe_record", "merge_groups", "param_groups", "probe_nll", "unwrap_model"]
