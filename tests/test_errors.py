"""One test per bad input: the exception type and that the message names the argument and the problem."""
from __future__ import annotations

import math

import pytest
import torch

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.ops.token_logprobs import TokenLogprobsOptions

LOSSES = ["satimp_loss", "wga_loss", "simimp_loss", "ga_loss"]
ALL = ["token_logprobs", *LOSSES]


def call(name, x, labels, **kw):
    return getattr(fastweight, name)(x, labels, **kw)


def inputs(N=4, V=10, dtype=torch.float32):
    return torch.randn(N, V, dtype=dtype), torch.randint(0, V, (N,))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [10, 11, -1, -99, -101])
def test_label_out_of_range(name, bad):
    z, y = inputs()
    y[2] = bad
    with pytest.raises(ValueError, match=rf"labels out of range: labels.flatten\(\)\[2\] = {bad}, expected 0 <= label < V = 10"):
        call(name, z, y)


def test_label_out_of_range_with_shift_and_custom_ignore_index():
    z = torch.randn(2, 3, 5)
    y = torch.full((2, 3), -1)
    y[1, 2] = 5
    with pytest.raises(ValueError, match=r"labels out of range.*= 5.*ignore_index = -1"):
        fastweight.satimp_loss(z, y, shift=True, ignore_index=-1)
    # IGNORE_INDEX is not special when another ignore_index is chosen.
    y[1, 2] = IGNORE_INDEX
    with pytest.raises(ValueError, match=rf"= {IGNORE_INDEX}"):
        fastweight.satimp_loss(z, y, shift=True, ignore_index=-1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(5,), (4, 1), (2, 2)])
def test_label_shape_mismatch(name, shape):
    z, _ = inputs()
    with pytest.raises(ValueError, match=r"labels shape .* does not match .*logits.* \(4,\)"):
        call(name, z, torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_logits(name, dtype):
    _, y = inputs()
    with pytest.raises(TypeError, match=rf"logits must be a floating tensor.*got {dtype}"):
        call(name, torch.ones(4, 10, dtype=dtype), y)


@pytest.mark.parametrize("name", ALL)
def test_logits_not_a_tensor(name):
    _, y = inputs()
    with pytest.raises(TypeError, match=r"logits must be a torch.Tensor, got list"):
        call(name, [[0.0] * 10] * 4, y)


@pytest.mark.parametrize("name", ALL)
def test_logits_one_dimensional(name):
    with pytest.raises(ValueError, match=r"logits must have at least 2 dimension"):
        call(name, torch.randn(10), torch.tensor(3))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_float_or_bool_labels(name, dtype):
    z, y = inputs()
    with pytest.raises(TypeError, match=rf"labels must be an integer tensor .*got {dtype}"):
        call(name, z, y.to(dtype))


@pytest.mark.parametrize("name", ALL)
def test_labels_not_a_tensor(name):
    z, y = inputs()
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor, got list"):
        call(name, z, y.tolist())


@pytest.mark.parametrize("name", ALL)
def test_labels_on_another_device(name):
    # A 'meta' tensor stands in for a second device (no GPU needed).
    z, y = inputs()
    with pytest.raises(ValueError, match=r"labels is on meta but the input is on cpu"):
        call(name, z, y.to("meta"))


@pytest.mark.parametrize("name", ALL)
def test_lm_head_on_another_device(name):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"lm_head is on meta but hidden is on cpu"):
        call(name, hidden, y, lm_head=torch.randn(10, 6, device="meta"))


@pytest.mark.parametrize("kw,arg", [({"beta1": -1.0}, "beta1"), ({"beta2": -0.5}, "beta2"),
                                    ({"beta1": math.nan}, "beta1"), ({"beta2": math.inf}, "beta2")])
def test_bad_satimp_betas(kw, arg):
    z, y = inputs()
    with pytest.raises(ValueError, match=rf"{arg} must be finite and >= 0, got"):
        fastweight.satimp_loss(z, y, **kw)


@pytest.mark.parametrize("name", ["wga_loss", "simimp_loss"])
@pytest.mark.parametrize("value", [-1.0, math.nan, -math.inf])
def test_bad_one_sided_beta(name, value):
    z, y = inputs()
    with pytest.raises(ValueError, match=r"^beta must be finite and >= 0"):
        call(name, z, y, beta=value)


@pytest.mark.parametrize("kw,arg", [({"beta1": True}, "beta1"), ({"beta2": "0.1"}, "beta2"),
                                    ({"beta1": torch.tensor(1.0)}, "beta1")])
def test_non_number_satimp_betas(kw, arg):
    z, y = inputs()
    with pytest.raises(TypeError, match=rf"{arg} must be a real number, got"):
        fastweight.satimp_loss(z, y, **kw)


@pytest.mark.parametrize("name", ["wga_loss", "simimp_loss"])
def test_bool_one_sided_beta(name):
    z, y = inputs()
    with pytest.raises(TypeError, match=r"^beta must be a real number, got bool"):
        call(name, z, y, beta=False)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["avg", "MEAN", None, "batchmean"])
def test_bad_reduction(name, reduction):
    z, y = inputs()
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\), got"):
        call(name, z, y, reduction=reduction)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend", ["cuda", "TORCH", "liger", ""])
def test_bad_backend(name, backend):
    z, y = inputs()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got"):
        call(name, z, y, backend=backend)


@pytest.mark.parametrize("name", ALL)
def test_triton_backend_on_cpu_without_interpreter(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y = inputs()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .*TRITON_INTERPRET=1.*got tensors on cpu"):
        call(name, z, y, backend="triton")


def test_triton_backend_rejects_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # resolve_backend reads the variable at call time
    z, y = inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton' supports .*got torch.float64"):
        fastweight.satimp_loss(z, y, backend="triton")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite(name, bad):
    z, y = inputs()
    z[1, 3] = bad
    with pytest.raises(ValueError, match=r"logits contains NaN or infinite values"):
        call(name, z, y, check_finite=True)


def test_check_finite_off_by_default():
    z, y = inputs()
    z[1, 3] = math.nan
    assert bool(fastweight.token_logprobs(z, y)[1].isnan())  # no scan, no error: the NaN propagates


@pytest.mark.parametrize("name", ALL)
def test_lm_head_wrong_hidden_size(name):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"lm_head must be \[V, H\] with H = 6, got shape \(10, 5\)"):
        call(name, hidden, y, lm_head=torch.randn(10, 5))


@pytest.mark.parametrize("name", ALL)
def test_lm_head_not_2d(name):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"lm_head must be \[V, H\]"):
        call(name, hidden, y, lm_head=torch.randn(2, 10, 6))


@pytest.mark.parametrize("name", ALL)
def test_lm_head_integer(name):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match=r"lm_head must be a floating tensor"):
        call(name, hidden, y, lm_head=torch.ones(10, 6, dtype=torch.long))


@pytest.mark.parametrize("name", ALL)
def test_label_out_of_range_for_lm_head_vocab(name):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    y[0] = 10
    with pytest.raises(ValueError, match=r"labels out of range.*V = 10"):
        call(name, hidden, y, lm_head=torch.randn(10, 6))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("softcap", [0.0, -1.0, math.nan, "30"])
def test_bad_softcap(name, softcap):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"softcap must be a positive number or None, got"):
        call(name, hidden, y, lm_head=torch.randn(10, 6), softcap=softcap)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kw", [{"bias": torch.zeros(10)}, {"softcap": 30.0}, {"logit_scale": 0.5}])
def test_bias_or_softcap_without_lm_head(name, kw):
    z, y = inputs()
    with pytest.raises(ValueError, match=r"bias, softcap and logit_scale are only meaningful with lm_head"):
        call(name, z, y, **kw)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale,exc", [(0.0, ValueError), (-2.0, ValueError), (math.inf, ValueError),
                                       ("8", TypeError)])
def test_bad_logit_scale(name, scale, exc):
    hidden, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    with pytest.raises(exc, match=r"logit_scale must be a"):
        call(name, hidden, y, lm_head=torch.randn(10, 6), logit_scale=scale)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value", [True, 1.5, "-100"])
def test_bad_ignore_index(name, value):
    z, y = inputs()
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got"):
        call(name, z, y, ignore_index=value)


def test_empty_vocabulary():
    with pytest.raises(ValueError, match=r"logits has an empty last dimension \(shape \(3, 0\)\)"):
        fastweight.token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


def test_options_validate_once():
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        TokenLogprobsOptions(reduction="avg")
    with pytest.raises(ValueError, match=r"beta2 must be finite and >= 0, got -1"):
        TokenLogprobsOptions(beta2=-1)
