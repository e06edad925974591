"""bitft.ternary_init: the rewritten master weights absmean-quantize to the target rule's codes and scale
(so every consumer of the format, online or exported, sees that ternary model), the mse rule is
the least-squares fixed point and beats the absmean scale on weight error, and the recipe applies
it only where it means something."""

from __future__ import annotations

import pytest
import torch

from bitft.errors import ConfigError
from bitft.quant import ternarize
from bitft.ternary_init import apply_ternary_init, parse_rule, rewrite, target_scale
from helpers import tiny_model


def weights(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(96, 160, generator=g) * 0.02
    t = torch.distributions.StudentT(3.0).sample((96, 160))  # heavy tails, like LLM weights' outliers
    return t * 0.01


def codes_at(w: torch.Tensor, s: float) -> torch.Tensor:
    return (w.float() / s).round().clamp(-1, 1).to(torch.int8)


@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("rule", ["mse", 1.5, 0.8, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewritten_weights_absmean_quantize_to_the_target(kind, rule, dtype):
    w = weights(kind)
    s = target_scale(w, rule)
    w2 = rewrite(w, s, dtype)
    assert w2.dtype == dtype
    codes, scale = ternarize(w2)
    assert torch.equal(codes, codes_at(w, s))  # the target codes, bit for bit
    assert scale.item() == pytest.approx(s, rel=1e-5 if dtype == torch.float32 else 1e-3)  # from mean|W'| itself


def test_rewrite_moves_only_the_nonzero_codes_weights():
    w = weights("gaussian")
    s = target_scale(w, 1.5)
    w2 = rewrite(w, s)
    zero = codes_at(w, s) == 0
    inside = zero & (w.abs() < s / 2 * (1 - 1e-3))  # a margin below the threshold keeps rounding stable
    assert torch.equal(w2[inside], w[inside]) and (w2[zero] - w[zero]).abs().max() <= s * 1e-3
    assert torch.equal(torch.sign(w2), torch.sign(w))


@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
def test_mse_scale_is_the_lloyd_fixed_point_and_lowers_the_weight_error(kind):
    w = weights(kind)
    s = target_scale(w, "mse")
    mag = w.abs()
    assert mag[mag > s / 2].mean().item() == pytest.approx(s, rel=1e-5)
    a = target_scale(w, "absmean")
    err = lambda scale: (w - codes_at(w, scale).float() * scale).pow(2).sum().item()  # noqa: E731
    assert err(s) < err(a)
    if kind == "gaussian":
        assert 1.4 < s / a < 1.8


def test_rules_are_parsed_with_one_clear_line():
    assert parse_rule("MSE") == "mse" and parse_rule("absmean") == "absmean" and parse_rule("1.5") == 1.5
    for bad in ("lloyd", "-1", "0", "nan", "inf"):
        with pytest.raises(ConfigError, match="ternary_init.*absmean, mse, gptq or a positive"):
            parse_rule(bad)


def test_model_rewrite_gives_the_target_codes_and_bumps_the_cache():
    from bitft.surgery import bit_linears, convert_model

    model = convert_model(tiny_model("llama"), lam=1.0).eval()

    layers = bit_linears(model)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits0 = model(input_ids=x).logits
    done = apply_ternary_init(model, "mse")
    assert done["layers"] == len(layers) and done["mean_gamma"] > 1
    for n, m in layers.items():
        codes, _ = ternarize(m.weight)
        assert torch.equal(codes, codes_at(before[n], target_scale(before[n], "mse")))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, logits0)  # no stale cached codes


def correlated_inputs(n: int = 512, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix  # correlated features, as in a transformer's hidden states


def test_gptq_codes_lower_the_output_error_and_rewrite_to_them():
    from bitft.ternary_init import gptq_columns

    x = correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    s = target_scale(w, "gptq")
    values = gptq_columns(w, x.T @ x, s, damp=1e-4)
    gptq, nearest = codes_at(values, s), codes_at(w, s)
    out_err = lambda codes: (x @ w.T - x @ (codes.float() * s).T).pow(2).sum().item()  # noqa: E731
    assert out_err(gptq) < 0.9 * out_err(nearest)  # 0.86 here
    codes, scale = ternarize(rewrite(values, s))
    assert torch.equal(codes, gptq) and scale.item() == pytest.approx(s, rel=1e-5)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    from bitft.ternary_init import gptq_columns

    w = weights("gaussian")
    s = target_scale(w, "absmean")
    values = gptq_columns(w, 3.0 * torch.eye(w.shape[1]), s, damp=0.0)
    assert torch.equal(codes_at(values, s), codes_at(w, s))


def test_gptq_on_a_model_needs_calibration_and_passes_do_not_change_it(monkeypatch):
    import bitft.ternary_init as ti
    from bitft.surgery import bit_linears, convert_model

    with pytest.raises(ConfigError, match="gptq needs calibration blocks"):
        apply_ternary_init(convert_model(tiny_model("llama"), lam=1.0), "gptq")
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    one = convert_model(tiny_model("llama"), lam=1.0)
    apply_ternary_init(one, "gptq", blocks)
    monkeypatch.setattr(ti, "HESSIAN_BYTES", 1)  # one module per calibration pass
    many = convert_model(tiny_model("llama"), lam=1.0)
    apply_ternary_init(many, "gptq", blocks)
    for (name, a), (_, b) in zip(bit_linears(one).items(), bit_linears(many).items()):
        assert torch.allclose(a.weight, b.weight, atol=1e-6), name  # every pass saw the original model
