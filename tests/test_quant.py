import math

import pytest
import torch
import torch.nn.functional as F

from bitft import BitLinear
from bitft.quant import (activation_codes, blend, packed_weight_scale, quantize_activation, quantize_weight,
                         ternarize, weight_codes)


def test_weight_is_ternary_times_absmean():
    torch.manual_seed(0)
    w = torch.randn(32, 48) * 0.02
    q = quantize_weight(w)
    s = w.abs().mean()
    codes = q / s
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert set(codes.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(q.abs().max(), s)  # one scale for the whole tensor
    # round(W / s) clamped: the big weights go to ±1, the small ones to 0
    assert torch.equal(codes.round(), (w / s).round().clamp(-1, 1))


def test_ternarize_codes_and_scale_rebuild_the_weight():
    w = torch.randn(16, 8)
    codes, scale = ternarize(w)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.allclose(codes.float() * scale, quantize_weight(w))


def test_zero_weight_does_not_divide_by_zero():
    assert torch.equal(quantize_weight(torch.zeros(4, 4)), torch.zeros(4, 4))
    assert torch.equal(quantize_activation(torch.zeros(2, 4)), torch.zeros(2, 4))


def test_activation_is_int8_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1)
    q = quantize_activation(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    levels = q / step
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.round().min() >= -128 and levels.round().max() <= 127
    # the largest entry of every token is exactly representable
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1))
    assert (q - x).abs().max() <= step.max() / 2 + 1e-6


def test_blend_is_exact_at_both_ends_and_linear_between():
    t, q = torch.randn(100), torch.randn(100)
    assert blend(t, q, 0.0) is t
    assert torch.equal(blend(t, q, 1.0), q)
    assert torch.allclose(blend(t, q, 0.25), t + 0.25 * (q - t))


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_straight_through_gradient_is_identity(lam):
    t = torch.randn(10, requires_grad=True)
    g = torch.randn(10)
    blend(t, quantize_weight(t), lam).backward(g)
    assert torch.equal(t.grad, g)


def test_bitlinear_lambda_zero_is_the_linear_bit_for_bit():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(4, 7, 32)
    bl = BitLinear.from_linear(lin, lam=0.0)
    assert bl.weight is lin.weight and bl.bias is lin.bias  # shared, not copied
    assert isinstance(bl, torch.nn.Linear)
    assert torch.equal(bl(x), lin(x))


def test_bitlinear_lambda_one_is_w158a8():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(4, 7, 32)
    bl = BitLinear.from_linear(lin, lam=1.0)
    # integer codes multiplied, the scales applied after (transformers' packed BitLinear's order)
    xc, a = activation_codes(x)
    wc, inv = weight_codes(lin.weight)
    ws = packed_weight_scale(inv)
    assert torch.equal(bl(x), (xc.double() @ wc.double().t()).float() / (ws * a) + lin.bias)
    # the same numbers as the dequantized (fake-quant) product, up to float32 rounding
    torch.testing.assert_close(bl(x), F.linear(quantize_activation(x), quantize_weight(lin.weight), lin.bias),
                               rtol=1e-6, atol=1e-6)
    bl.lam = 0.5
    mid = F.linear(x + 0.5 * (quantize_activation(x) - x), lin.weight + 0.5 * (quantize_weight(lin.weight) - lin.weight), lin.bias)
    assert torch.allclose(bl(x), mid, atol=1e-6)


def test_bitlinear_trains_its_master_weight_in_bf16():
    lin = torch.nn.Linear(32, 16, dtype=torch.bfloat16)
    bl = BitLinear.from_linear(lin, lam=1.0)
    x = torch.randn(2, 32, dtype=torch.bfloat16, requires_grad=True)
    y = bl(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert bl.weight.grad is not None and torch.isfinite(bl.weight.grad.float()).all()
    assert x.grad is not None and not math.isnan(x.grad.float().sum().item())


def test_bitlinear_rejects_bad_lambda():
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="λ"):
            BitLinear(4, 4, lam=bad)
