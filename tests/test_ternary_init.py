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
def test_rewritten_weights_absmean_quantize_to_the_target(kind, rule):
    w = weights(kind)
    s = target_scale(w, rule)
    codes, scale = ternarize(rewrite(w, s))
    assert torch.equal(codes, codes_at(w, s))  # the target codes, bit for bit
    assert scale.item() == pytest.approx(s, rel=1e-5)  # and the target scale, from mean|W'| itself


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
    for bad in ("lloyd", "-1", "0", "nan"):
        with pytest.raises(ConfigError, match="ternary_init.*absmean, mse or a positive"):
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
