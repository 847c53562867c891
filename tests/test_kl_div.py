"""Fused row-wise KL op (fastweight.ops.kl_div) vs the naive float64 reference (reference/kl_div.py)."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, DTYPES, compare_with_reference, make_logits, upstream_like

from fastweight.ops import kl_div as kl_mod
from fastweight.ops.kl_div import kl_div
from fastweight.reference.kl_div import kl_div as kl_ref


def _pair(N, V, dtype, *, seed=0, offset=0.0, confident=(), ignore=()):
    z, labels = make_logits(N, V, dtype, seed=seed, offset=offset, confident_rows=confident, ignore_rows=ignore)
    r, _ = make_logits(N, V, dtype, seed=seed + 100, offset=offset, confident_rows=confident)
    return z, r, labels


def _check(z, r, labels, dtype, backend, ref_shift=0.0):
    up = upstream_like(z.shape[:1], dtype)
    compare_with_reference(lambda x: kl_div(x, r, labels, ref_shift=ref_shift, backend=backend),
                           lambda x: kl_ref(x, r.to(x.dtype), labels, ref_shift=ref_shift), [z], dtype=dtype,
                           upstream=up, names=["logits"])


CASES = [  # N, V, kw
    (1, 1013, {}), (5, 4097, {}), (6, 257, dict(confident=(0, 3))), (4, 300, dict(offset=1000.0)),
    (6, 130, dict(ignore=(1, 4))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("N,V,kw", CASES)
@pytest.mark.parametrize("with_labels", [False, True])
def test_kl_div_torch(dtype, N, V, kw, with_labels):
    z, r, labels = _pair(N, V, dtype, **kw)
    _check(z, r, labels if with_labels else None, dtype, "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_kl_div_ref_shift_and_chunks(dtype, monkeypatch):
    monkeypatch.setattr(kl_mod, "TORCH_CHUNK_ELEMENTS", 3 * 101)  # several chunks, the last one partial
    z, r, labels = _pair(8, 101, dtype, ignore=(2,))
    _check(z, r, labels, dtype, "torch", ref_shift=10.0)


def test_kl_div_identical_rows_and_non_contiguous():
    z, _, labels = _pair(6, 64, torch.float32)
    x = z.clone().requires_grad_()
    kl = kl_div(x, z)
    kl.sum().backward()
    assert kl.abs().max() < 1e-5 and x.grad.abs().max() < 1e-6
    wide = torch.randn(6, 128)
    zz, rr = wide[:, ::2], torch.randn(6, 128)[:, 1::2]
    torch.testing.assert_close(kl_div(zz, rr), kl_ref(zz.double(), rr.double()).float(), rtol=1e-5, atol=1e-6)


def test_kl_div_errors():
    z, r, labels = _pair(3, 17, torch.float32)
    with pytest.raises(ValueError, match="ref_logits shape"):
        kl_div(z, r[:, :5])
    with pytest.raises(ValueError, match="requires grad"):
        kl_div(z, r.clone().requires_grad_())
    with pytest.raises(ValueError, match="ref_shift"):
        kl_div(z, r, ref_shift=1.0)
    with pytest.raises(ValueError, match="labels out of range"):
        kl_div(z, r, torch.tensor([0, 17, 1]))
    with pytest.raises(TypeError, match="ref_logits must be a floating"):
        kl_div(z, r.long())
    with pytest.raises(ValueError, match="ref_shift must be finite"):
        kl_div(z, r, labels, ref_shift=float("inf"))
    with pytest.raises(ValueError, match="check|NaN"):
        kl_div(z, r.masked_fill(r > 1, float("nan")), check_finite=True)


def test_kl_div_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, r, _ = _pair(2, 17, torch.float32)
    with pytest.raises(ValueError, match="backend='triton'"):
        kl_div(z, r, backend="triton")


def test_aot_cases_cover_every_constexpr_combination():
    cases = kl_mod.aot_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)) == 3 * (2 * 2 + 2)
    combos = {(c["signature"]["logits_ptr"], c["name"].split("_")[2], c["constexprs"]["HAS_LABELS"]) for c in cases}
    assert combos == {(f"*{d}", kern, lab) for d in ("fp32", "bf16", "fp16") for kern in ("fwd", "bwd")
                      for lab in (False, True)}
    for c in cases:
        assert set(c["constexprs"]) == {"HAS_LABELS", "BLOCK_V"}
        assert all(v == "constexpr" for k, v in c["signature"].items() if k in c["constexprs"])
        params = c["fn"].arg_names
        assert list(c["signature"]) == params, (c["name"], params)
    blocks = {(c["signature"]["logits_ptr"], c["constexprs"]["BLOCK_V"]) for c in cases}
    assert ("*fp32", kl_mod.BLOCK_V_MAX[torch.float32]) in blocks and ("*bf16", 1024) in blocks


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("N,V,kw", [(1, 1013, {}), (3, 2053, dict(confident=(1,))), (4, 70, dict(ignore=(2,)))])
@pytest.mark.parametrize("with_labels", [False, True])
def test_kl_div_triton_interpret(dtype, N, V, kw, with_labels):
    z, r, labels = _pair(N, V, dtype, **kw)
    _check(z, r, labels if with_labels else None, dtype, "triton", ref_shift=3.0 if with_labels else 0.0)


def test_kl_div_float64_gradient_stays_float64():
    """The torch path keeps a float64 upstream gradient in float64 (it used to be cast to float32)."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 23, generator=gen, dtype=torch.float64)
    r = torch.randn(4, 23, generator=gen, dtype=torch.float64)
    g = torch.randn(4, generator=gen, dtype=torch.float64) * (1 + 1e-12)  # not representable in float32
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    kl_div(x1, r, backend="torch").backward(g)
    kl_ref(x2, r).backward(g)
    assert x1.grad.dtype == torch.float64
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_kl_div_nonfinite_ignored_rows_give_zero_gradient(backend):
    z, r, labels = _pair(6, 37, torch.float32, ignore=(1, 4))
    z[1], z[4] = float("nan"), float("-inf")
    x = z.clone().requires_grad_()
    out = kl_div(x, r, labels, ref_shift=2.0, backend=backend)
    out.backward(torch.linspace(0.5, 2.0, 6))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(x.grad).all())
    assert bool((x.grad[[1, 4]] == 0).all())
