"""Ops: autograd Functions over the Triton kernels and their chunked torch twins."""
from fastweight.ops.token_logprobs import TokenLogprobsOptions, token_logprobs_2d, weighted_logprobs_2d

__all__ = ["TokenLogprobsOptions", "token_logprobs_2d", "weighted_logprobs_2d"]
