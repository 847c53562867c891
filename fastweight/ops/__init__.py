"""Ops: autograd Functions over the Triton kernels and their chunked torch twins."""
from fastweight.ops.token_logprobs import TokenLogprobsOptions, token_logprobs

__all__ = ["TokenLogprobsOptions", "token_logprobs"]
