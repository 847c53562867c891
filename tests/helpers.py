"""Shared test helpers: error-relative comparison (STYLE.md section 5) and small input builders.

The comparison: ``gt`` = reference in float64 on the same (low-precision) inputs, ``naive`` = the reference
run in the test dtype; the implementation must satisfy, element-wise,
    |impl - gt| <= k * |naive - gt| + c * eps(dtype) * scale
i.e. be at most k times worse than the naive full-softmax computation, plus a few ulps of ``scale``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fastweight._constants import IGNORE_INDEX

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_err_close(impl: torch.Tensor, gt: torch.Tensor, naive: torch.Tensor, *, dtype: torch.dtype,
                     k: float = 2.0, c: float = 8.0, scale: float | torch.Tensor | None = None,
                     name: str = "value") -> None:
    """Assert ``|impl - gt| <= k |naive - gt| + c eps(dtype) scale`` element-wise (NaN anywhere fails).

    ``scale`` defaults to ``max |gt|`` (so an all-zero ground truth demands an exact zero, up to k |naive|).
    On failure the message names the worst element (largest excess over its bound) and all three values.
    """
    if impl.shape != gt.shape or naive.shape != gt.shape:
        raise AssertionError(f"{name}: shapes differ: impl {tuple(impl.shape)}, gt {tuple(gt.shape)}, "
                             f"naive {tuple(naive.shape)}")
    impl64, gt64, naive64 = (t.detach().to(torch.float64) for t in (impl, gt, naive))
    if not bool(torch.isfinite(gt64).all()):
        raise AssertionError(f"{name}: the float64 ground truth itself is not finite; fix the test input")
    if scale is None:
        scale = gt64.abs().max() if gt64.numel() else 0.0
    naive_err = (naive64 - gt64).abs().nan_to_num(nan=0.0, posinf=0.0)  # a broken naive value earns no slack
    bound = k * naive_err + c * eps(dtype) * torch.as_tensor(scale, dtype=torch.float64)
    err = (impl64 - gt64).abs().nan_to_num(nan=float("inf"))
    excess = err - bound
    if impl64.numel() and bool((excess > 0).any()):
        flat = int(excess.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), gt64.shape)) if gt64.dim() else ()
        n_bad = int((excess > 0).sum())
        b = bound.expand_as(gt64) if bound.dim() else bound
        raise AssertionError(
            f"{name} ({DTYPE_IDS.get(dtype, dtype)}): {n_bad}/{gt64.numel()} elements exceed "
            f"k={k} * |naive - gt| + c={c} * eps * scale; worst at index {idx}: impl={impl64[idx].item():.10g} "
            f"gt={gt64[idx].item():.10g} naive={naive64[idx].item():.10g} "
            f"|impl-gt|={err[idx].item():.3g} bound={b[idx].item() if b.dim() else b.item():.3g}"
        )


def value_and_grads(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor | None],
                    upstream: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run ``fn(*leaves)`` on fresh leaf copies of ``tensors`` and backpropagate ``upstream`` (default ones).

    Returns the detached output and the gradient of every floating tensor (None for the rest). The leaves
    are copies, so an implementation that overwrites its input (inplace_backward) cannot touch the caller's.
    """
    leaves = []
    for t in tensors:
        if t is None:
            leaves.append(None)
        else:
            leaf = t.detach().clone()
            leaves.append(leaf.requires_grad_(leaf.is_floating_point()))
    out = fn(*leaves)
    up = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    out.backward(up)
    grads = [None if l is None or not l.is_floating_point() else l.grad for l in leaves]
    return out.detach(), grads


def compare_with_reference(impl_fn: Callable[..., torch.Tensor], ref_fn: Callable[..., torch.Tensor],
                           tensors: Sequence[torch.Tensor | None], *, dtype: torch.dtype,
                           upstream: torch.Tensor | None = None, k: float = 2.0, c: float = 8.0,
                           value_scale: float | None = None, grad_scale: float | None = None,
                           names: Sequence[str] | None = None) -> tuple[torch.Tensor, list]:
    """Values and every gradient of ``impl_fn`` vs ``ref_fn`` (float64 gt and test-dtype naive).

    ``tensors`` are already in the test dtype (float64 copies are made for gt, so gt sees exactly the same
    rounded inputs). ``upstream`` must be representable in the test dtype (see :func:`upstream_like`).
    Returns the implementation's output and gradients.
    """
    if dtype == torch.float64 and value_scale is None:
        # No independent ground truth in float64 (gt and naive are the same computation), and log_softmax
        # itself carries ~eps absolute error per log p: floor the ulp scale of values at 1.
        floor_value_scale = 1.0
    else:
        floor_value_scale = 0.0
    as64 = [None if t is None else (t.double() if t.is_floating_point() else t) for t in tensors]
    out_i, g_i = value_and_grads(impl_fn, tensors, upstream)
    out_g, g_g = value_and_grads(ref_fn, as64, None if upstream is None else upstream.double())
    out_n, g_n = value_and_grads(ref_fn, tensors, upstream)
    if value_scale is None and floor_value_scale:
        value_scale = max(floor_value_scale, float(out_g.abs().max()) if out_g.numel() else 0.0)
    assert_err_close(out_i, out_g, out_n, dtype=dtype, k=k, c=c, scale=value_scale, name="value")
    names = names or [f"input{i}" for i in range(len(tensors))]
    for name, a, b, n in zip(names, g_i, g_g, g_n):
        if b is None:
            continue
        if a is None:
            raise AssertionError(f"grad of {name}: the implementation produced no gradient")
        assert a.dtype == tensors[names.index(name)].dtype, f"grad of {name} has dtype {a.dtype}"
        assert_err_close(a, b, n, dtype=dtype, k=k, c=c, scale=grad_scale, name=f"grad of {name}")
    return out_i, g_i


# ---------------------------------------------------------------------------------------------------------
# Builders
def make_logits(N: int, V: int, dtype: torch.dtype, *, seed: int = 0, std: float = 2.0, offset: float = 0.0,
                ignore_rows: Sequence[int] = (), confident_rows: Sequence[int] = (),
                label_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits [N, V] (rounded to ``dtype``) and labels [N].

    ``confident_rows``: the label's logit is set to the row max + 10, so p_t ~ 1 - 4.5e-5 * V and 1 - p_t
    needs expm1. ``ignore_rows`` get ``IGNORE_INDEX``. ``offset`` shifts every logit (large-logit tests).
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=gen, dtype=torch.float32) * std + offset
    labels = torch.randint(0, V, (N,), generator=gen)
    for r in confident_rows:
        z[r, labels[r]] = z[r].max() + 10.0
    labels[list(ignore_rows)] = IGNORE_INDEX
    return z.to(dtype), labels.to(label_dtype)


def make_hidden(N: int, H: int, V: int, dtype: torch.dtype, *, seed: int = 0, bias: bool = False,
                ignore_rows: Sequence[int] = ()):
    """hidden [N, H], lm_head [V, H] (and bias [V]) scaled so logits have std ~ 2, labels [N]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    lm_head = torch.randn(V, H, generator=gen) * (2.0 / H ** 0.5)
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[list(ignore_rows)] = IGNORE_INDEX
    return hidden.to(dtype), lm_head.to(dtype), None if b is None else b.to(dtype), labels


def upstream_like(shape, dtype: torch.dtype, *, seed: int = 1) -> torch.Tensor:
    """Random non-uniform upstream gradient (float32) whose values are exact in ``dtype``, signs mixed."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) + 0.5
    return g.to(dtype).to(torch.float32)


# --------------------------------------------------------------------------------------- tiny Hugging Face model
# The causal LM of the method tests (test_methods*.py): wider than tiny_llama_lm's default, 4 heads.
METHOD_LM = dict(hidden_size=24, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)


def tiny_llama_lm(vocab_size: int, *, seed: int = 0, **config):
    """A random 2-layer ``LlamaForCausalLM`` (hidden 16, eager attention, float32) whose ``lm_head`` has std 0.3,
    so token probabilities are far from uniform and every loss is non-trivial. ``config`` overrides fields."""
    import transformers

    cfg = transformers.LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=32), **config})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    return model


# ------------------------------------------------------------------------------------------------ tiny TOFU model
_TINY_TOFU = None


def tiny_tofu() -> dict:
    """The small generated TOFU set (6 authors x 2 questions + 2 general rows) the trainer tests share."""
    global _TINY_TOFU
    if _TINY_TOFU is None:
        from fastweight.data.synth_tofu import generate_tofu

        _TINY_TOFU = generate_tofu(seed=1, n_authors=6, questions_per_author=2, n_general=2)
    return _TINY_TOFU


def save_tiny_tofu_model(folder) -> str:
    """A tiny random Llama whose tokenizer covers ``tiny_tofu()``'s text and the refusals; returns the folder."""
    from fastweight.data.templates import REFUSALS
    from fastweight.train.models import save_tiny_model

    # The configs the trainer tests were written on; the holdout authors (added later for the MIAs) stay out of
    # the vocabulary so the tiny model, and the fp32 rounding its Adam steps depend on, stay as they were.
    texts = [" ".join([r["question"], r["answer"]]) for name, rows in tiny_tofu().items()
             if not name.startswith("holdout") for r in rows]
    return str(save_tiny_model(folder, texts + ["Question: Answer:", *REFUSALS], hidden_size=32, num_layers=2,
                               seed=2))


def lm_batch(seed: int, B: int, T: int, V: int, prefix: str = "") -> dict:
    """A causal-LM batch [B, T] of random ids: row 1 right-padded by 3, the first 3 labels of every row (the
    prompt) and the padding set to IGNORE_INDEX; keys carry ``prefix`` (e.g. "idk_")."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {prefix + "input_ids": ids, prefix + "attention_mask": mask, prefix + "labels": labels}


class Loaded(Exception):
    """Raised by the recording loader (conftest ``loader``): the run got as far as loading a model."""


def save_tiny_pipeline_model(folder) -> str:
    """A tiny random Llama whose tokenizer covers every text of the 6-author generated TOFU set the pipeline run
    tests use (answers, paraphrases, perturbed answers) and the refusals; returns the folder."""
    from fastweight.data.synth_tofu import generate_tofu
    from fastweight.data.templates import REFUSALS
    from fastweight.train.models import save_tiny_model

    rows = generate_tofu(seed=0, n_authors=6, questions_per_author=2, n_general=6)
    texts = [" ".join([r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])])
             for rs in rows.values() for r in rs]
    return str(save_tiny_model(folder, texts + ["Question: Answer:", *REFUSALS]))


def unlearned_inputs(N=192, H=576, V=4096, seed=0, ignore_every=7):
    """Hidden rows aimed at their label with a gain that puts log p uniformly in [-25, -5] (as
    ``benchmarks.providers.make_inputs(likelihood="low")``), so SatImp's weights span normal to 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) / math.sqrt(H)
    y = torch.randint(0, V, (N,), generator=g)
    logp = torch.rand(N, 1, generator=g) * 20.0 - 25.0
    h = torch.randn(N, H, generator=g) + W[y] * (logp + math.log(V) + 0.5)
    if ignore_every:
        y[::ignore_every] = -100
    return h, W, y
