"""BitLinear's autograd function: exact forward (transformers' packed BitLinear), STE gradients,
int8 saved tensors, the once-per-optimizer-step weight cache, the CPU integer-matmul chooser."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import bitft
import bitft.bitlinear as bl_mod
import bitft.kernels as kernels
from bitft import BitLinear
from bitft.quant import activation_codes as ref_activation_codes
from bitft.quant import pack_ternary, quantize_activation, quantize_weight, ternarize
from bitft.quant import weight_codes as ref_weight_codes
from helpers import tiny_model

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def layer(k=64, n=48, bias=True, lam=1.0, subln=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    m = BitLinear.from_linear(lin, lam=lam, subln=subln)
    if subln:
        with torch.no_grad():
            m.rms_norm.weight.uniform_(0.5, 1.5)
    return m


def packed_twin(m: BitLinear):
    """transformers' packed BitLinear holding what `bitft export --packed` writes for m."""
    from transformers.integrations.bitnet import BitLinear as PackedBitLinear

    p = PackedBitLinear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float32,
                        use_rms_norm=m.rms_norm is not None)
    codes, s = ternarize(m.weight)
    with torch.no_grad():
        p.weight.copy_(pack_ternary(codes))
        p.weight_scale.copy_((1.0 / s).reshape(1))  # as bitft/export/packed.py writes it
        if m.bias is not None:
            p.bias.copy_(m.bias)
        if m.rms_norm is not None:
            p.rms_norm.weight.copy_(m.rms_norm.weight)
    return p


# ----------------------------------------------------------------------------- forward values
def test_codes_are_the_reference_quantizers_values():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 7, 96) * torch.tensor([0.01, 1.0, 50.0]).view(3, 1, 1)).to(dtype)
        x[0, 0] = 0  # a zero token: the 1e-5 clamp
        xc, a = kernels.activation_codes(x)
        rc, ra = ref_activation_codes(x)
        assert xc.dtype == torch.int8 and torch.equal(xc, rc) and torch.equal(a, ra)
        assert torch.equal((xc.float() / a).to(dtype), quantize_activation(x))
        w = (torch.randn(40, 96) * 0.02).to(dtype)
        wc, inv = kernels.weight_codes(w)
        rwc, rinv = ref_weight_codes(w)
        assert torch.equal(wc, rwc) and torch.equal(inv, rinv)
        assert torch.equal((wc.float() / inv).to(dtype), quantize_weight(w))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("subln", [False, True])
def test_lambda_one_is_transformers_packed_bitlinear_bit_for_bit(bias, subln):
    for seed, (k, n) in enumerate([(64, 48), (96, 128), (200, 36)]):
        m = layer(k, n, bias=bias, subln=subln, seed=seed)
        p = packed_twin(m)
        x = torch.randn(2, 9, k) * 3
        with torch.no_grad():
            expected = p(x)
            assert torch.equal(m(x), expected)  # eval (no_grad, weight not cached)
        assert torch.equal(m(x), expected)  # training forward (cached weight codes)


def test_lambda_one_agrees_with_autobitlinear_to_float32_rounding():
    """The unpacked checkpoint's stock class multiplies dequantized values: equal up to rounding."""
    from transformers.integrations.bitnet import AutoBitLinear

    m = layer(256, 96)
    ab = AutoBitLinear(256, 96, bias=True, online_quant=True)
    ab.load_state_dict(m.state_dict())
    x = torch.randn(4, 16, 256)
    with torch.no_grad():
        ours, stock, fake = m(x), ab(x), m.fake_quant_forward(x)
    assert torch.equal(stock, fake)  # the reference formula is AutoBitLinear's, bit for bit
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    share_equal = (ours == stock).float().mean().item()
    assert 0.0 < share_equal < 1.0  # same integers, different float order: most values differ by an ulp or so


def test_tiny_model_equals_its_packed_twin_bit_for_bit(tokens):
    """Every layer of a converted model swapped for transformers' packed BitLinear: the same logits."""
    model = bitft.convert_model(tiny_model("qwen2"), lam=1.0, subln=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.rms_norm.weight.uniform_(0.5, 1.5)
        ours = model(tokens).logits
        for name, m in list(bitft.surgery.bit_linears(model).items()):
            model.set_submodule(name, packed_twin(m))
        assert torch.equal(model(tokens).logits, ours)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_inference_mode_gives_the_no_grad_logits(tokens, lam):
    """torch.inference_mode (generation in many serving stacks, the distillation teacher's path): inference
    tensors have no version counter, so their activation codes are not shared; the logits are the same."""
    model = bitft.convert_model(tiny_model("llama"), lam=lam).eval()
    with torch.no_grad():
        want = model(tokens).logits
    with torch.inference_mode():
        got = model(tokens).logits
        generated = model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want) and generated.shape == (1, 7)


def test_lambda_zero_and_between_keep_the_old_formula():
    m = layer(lam=0.0)
    x = torch.randn(5, 64)
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))
    m.lam = 0.3
    assert torch.equal(m(x), m.fake_quant_forward(x))


# ----------------------------------------------------------------------------- gradients
def grads(m, x, g, forward):
    x = x.clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = forward(x)
    (y * g).sum().backward()
    out = {"x": x.grad, "w": m.weight.grad}
    if m.bias is not None:
        out["b"] = m.bias.grad
    if m.rms_norm is not None:
        out["norm"] = m.rms_norm.weight.grad
    return y.detach(), out


@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("bias,subln", [(False, False), (True, False), (True, True)])
def test_gradients_are_the_straight_through_gradients(lam, bias, subln):
    m = layer(96, 64, bias=bias, lam=lam, subln=subln)
    x = torch.randn(3, 11, 96)
    g = torch.randn(3, 11, 64)
    y, got = grads(m, x, g, m)
    y_ref, ref = grads(m, x, g, m.fake_quant_forward)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)


def test_gradient_accumulation_equals_one_big_batch():
    m = layer(64, 32)
    x = torch.randn(8, 5, 64)
    g = torch.randn(8, 5, 32)
    _, big = grads(m, x, g, m)
    m.zero_grad(set_to_none=True)
    for i in range(4):  # 4 micro-batches of 2
        (m(x[2 * i:2 * i + 2]) * g[2 * i:2 * i + 2]).sum().backward()
    torch.testing.assert_close(m.weight.grad, big["w"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, big["b"], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_a_bf16_backward():
    m = layer(64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = m.fake_quant_forward(x)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- saved tensors
def saved_by(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_lambda_one_saves_int8_activations_and_2_bit_weight_codes_only():
    m = layer(128, 96)
    x = torch.randn(4, 32, 128, requires_grad=True)
    saved = saved_by(lambda: m(x))
    big = [t for t in saved if t.numel() > 4 * 32]
    assert sorted(str(t.dtype) for t in big) == ["torch.int8", "torch.uint8"]  # activation codes, packed weight codes
    assert sum(t.numel() * t.element_size() for t in saved) < 4 * 32 * 128 + 96 * 128 // 4 + 4 * 32 * 4 + 64
    ref = saved_by(lambda: m.fake_quant_forward(x))  # float copies of q(x) and q(W)
    assert sum(t.numel() * t.element_size() for t in ref) >= 4 * (4 * 32 * 128 + 96 * 128)


def test_the_cache_holds_the_packed_exports_bytes():
    m = layer(64, 48)
    m(torch.randn(3, 64))
    _, store, inv = m._wcache
    codes, s = ternarize(m.weight)
    assert store.dtype == torch.uint8 and torch.equal(store, pack_ternary(codes))
    assert torch.equal(kernels.unpack_codes(store), codes) and torch.equal(1.0 / inv, s)
    odd = layer(64, 30)  # out_features not a multiple of 4: int8 codes
    odd(torch.randn(3, 64))
    assert odd._wcache[1].dtype == torch.int8 and torch.equal(odd._wcache[1], ternarize(odd.weight)[0])


def test_layers_fed_the_same_input_share_one_set_of_activation_codes(monkeypatch):
    calls = []
    real = bl_mod.activation_codes
    monkeypatch.setattr(bl_mod, "activation_codes", lambda x: calls.append(1) or real(x))
    q, k, v = layer(64, 64, seed=1), layer(64, 16, seed=2), layer(64, 16, seed=3)
    x = torch.randn(2, 8, 64, requires_grad=True)
    saved = saved_by(lambda: (q(x), k(x), v(x)))
    assert len(calls) == 1
    codes = [t for t in saved if t.dtype == torch.int8 and t.shape == x.shape]
    assert len(codes) == 3 and len({t.data_ptr() for t in codes}) == 1
    with torch.no_grad():
        x.mul_(2)  # in place: a new version, new codes
    assert torch.equal(q(x), packed_twin(q)(x))
    assert len(calls) == 2


def test_below_lambda_one_the_blended_input_is_computed_once_and_saved_instead_of_x():
    """λ = 0.5: q/k/v save one shared lerp(x, xc/a, λ) (not x plus its codes), and it is not part of
    the autograd graph itself (the gradient to x is the straight-through one, checked elsewhere)."""
    q, k, v = (layer(64, n, seed=s, lam=0.5) for n, s in ((64, 1), (16, 2), (16, 3)))
    x = torch.randn(2, 8, 64, requires_grad=True)
    saved = saved_by(lambda: (q(x), k(x), v(x)))
    acts = [t for t in saved if t.shape == x.shape]
    assert len(acts) == 3 and len({t.data_ptr() for t in acts}) == 1 and acts[0].grad_fn is None
    assert not any(t is x for t in saved) and not any(t.dtype == torch.int8 and t.shape == x.shape for t in saved)
    torch.testing.assert_close(acts[0], bitft.quant.blend(x, quantize_activation(x), 0.5), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- weight cache
def count_weight_quantizations(monkeypatch):
    calls = []
    real = bl_mod.weight_codes
    monkeypatch.setattr(bl_mod, "weight_codes", lambda w, **kw: calls.append(w.shape) or real(w, **kw))
    return calls


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(BitLinear(32, 64, lam=1.0), torch.nn.GELU(), BitLinear(64, 32, lam=1.0))


def test_weights_are_quantized_once_per_optimizer_step(monkeypatch):
    calls = count_weight_quantizations(monkeypatch)
    net = mlp()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(6, 4, 32)
    for step in range(2):
        for micro in range(3):  # gradient accumulation
            net(x[2 * micro:2 * micro + 2]).pow(2).mean().backward()
        assert len(calls) == 2 * (step + 1)  # once per layer per step, none in the backward
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        net(x)  # eval after the step: the new weights, cached until the next step
        net(x)
    assert len(calls) == 6


def test_an_optimizer_step_frees_the_codes_and_an_older_graph_keeps_its_own():
    m = layer(32, 16)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x_old = torch.randn(4, 32, requires_grad=True)
    old = m(x_old).sum()
    w_before = quantize_weight(m.weight)
    m(torch.randn(4, 32)).sum().backward()
    assert m._wcache is not None
    opt.step()
    assert m._wcache is None and not kernels.WORKSPACE.bufs  # nothing held through the optimizer step
    m(torch.randn(4, 32))  # the new weights' codes
    assert not torch.equal(quantize_weight(m.weight), w_before)
    old.backward()  # the straight-through gradient of the forward it came from
    torch.testing.assert_close(x_old.grad, torch.ones(4, 16) @ w_before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [3])
def test_training_with_the_cache_equals_training_without(steps, monkeypatch):
    def train(cache):
        monkeypatch.setattr(bl_mod, "CACHE_WEIGHTS", cache)
        net = mlp(seed=4)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        torch.manual_seed(1)
        losses = []
        for _ in range(steps):
            for _ in range(2):
                loss = net(torch.randn(3, 32)).pow(2).mean()
                loss.backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        return losses, [p.detach().clone() for p in net.parameters()]

    l1, p1 = train(True)
    l0, p0 = train(False)
    assert l1 == l0 and len(set(l1)) > 1  # the weights moved, and the cache followed them
    assert all(torch.equal(a, b) for a, b in zip(p1, p0))


def test_in_place_changes_invalidate_the_cache(monkeypatch):
    calls = count_weight_quantizations(monkeypatch)
    m = layer(32, 16)
    x = torch.randn(4, 32)
    m(x)
    m(x)
    assert len(calls) == 1
    with torch.no_grad():
        m.weight.mul_(-1)  # _version bumps
    torch.testing.assert_close(m(x), m.fake_quant_forward(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    m.weight.data.mul_(-1)  # no version bump: an optimizer-style write through .data ...

    class DataWriter(torch.optim.Optimizer):  # ... as DeepSpeed ZeRO-2 does: caught by the step hook
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                p.data.add_(1.0)

    before = m(x).detach()
    DataWriter([m.weight]).step()
    after = m(x)
    assert len(calls) == 3 and not torch.equal(before, after)
    torch.testing.assert_close(after, m.fake_quant_forward(x), rtol=1e-5, atol=1e-5)


def test_frozen_and_zero3_weights_are_not_cached_and_not_saved_as_codes(monkeypatch):
    calls = count_weight_quantizations(monkeypatch)
    for kind in ("frozen", "zero3"):
        m = layer(64, 32)
        if kind == "frozen":
            m.weight.requires_grad_(False)
        else:
            m.weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
        x = torch.randn(4, 64, requires_grad=True)
        g = torch.randn(4, 32)
        n0 = len(calls)
        saved = saved_by(lambda: (m(x) * g).sum().backward())
        assert len(calls) - n0 == 2  # forward, and again in the backward from the (re-gathered) weight
        assert not any(t.dtype == torch.int8 and t.shape == m.weight.shape for t in saved)
        assert any(t is m.weight for t in saved)
        _, ref = grads(m, x.detach(), g, m.fake_quant_forward)
        torch.testing.assert_close(x.grad, ref["x"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_grads_without_requantizing(reentrant, monkeypatch):
    calls = count_weight_quantizations(monkeypatch)
    net = mlp(seed=2)
    x = torch.randn(4, 6, 32, requires_grad=True)
    net(x).square().sum().backward()
    plain = [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]
    n0 = len(calls)
    net.zero_grad(set_to_none=True)
    x.grad = None
    checkpoint(net, x, use_reentrant=reentrant).square().sum().backward()
    again = [p.grad for p in net.parameters()] + [x.grad]
    for a, b in zip(plain, again):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(calls) == n0  # same step: the recomputation reused the cached codes


# ----------------------------------------------------------------------------- the integer matmul
def exact(xc, wc):
    return (xc.long() @ wc.long().t()).float()


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (17, 576, 192), (64, 100, 36)])
def test_code_matmul_is_exact_on_every_kernel(m, k, n, monkeypatch):
    torch.manual_seed(0)
    xc = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    wc = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    want = exact(xc, wc)
    assert torch.equal(kernels.code_matmul(xc, wc).float(), want)  # whatever this CPU picks
    assert torch.equal(kernels._fp32_acc(xc, wc), want)
    assert torch.equal(kernels._int_acc(xc, wc).float(), want)
    xc_max = torch.full((m, k), -128, dtype=torch.int8)  # the largest |acc|: 128·K
    wc_max = torch.ones(n, k, dtype=torch.int8)
    assert torch.equal(kernels._fp32_acc(xc_max, wc_max), exact(xc_max, wc_max))


def test_avx2_only_cpus_use_the_float32_gemm_without_timing(monkeypatch):
    m = layer(64, 16)
    x = torch.randn(32, 64)
    want = m(x)  # this CPU's choice
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_vnni": False})
    monkeypatch.setattr(kernels, "_time", lambda *a, **k: pytest.fail("timed _int_mm on an AVX2 CPU"))
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: pytest.fail("_int_mm called on an AVX2 CPU"))
    monkeypatch.setattr(kernels, "_CHOICE", {})
    assert not kernels.cpu_has_int8_gemm()
    assert kernels.use_int_mm_cpu(512, 2048, 2048) is False
    xc = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    wc = torch.randint(-1, 2, (16, 64), dtype=torch.int8)
    assert torch.equal(kernels.code_matmul(xc, wc), exact(xc, wc))
    assert torch.equal(m(x), want)  # the same bits through the other kernel


def test_timing_the_kernels_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_vnni": True})
    monkeypatch.setattr(kernels, "_CHOICE", {})
    torch.manual_seed(5)
    kernels.use_int_mm_cpu(8, 64, 32)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_vnni_cpus_time_once_per_shape(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_vnni": True})
    monkeypatch.setattr(kernels, "_CHOICE", {})
    timed = []
    monkeypatch.setattr(kernels, "_time", lambda fn, *a, **k: timed.append(fn) or (1.0 if fn is kernels._fp32_acc else 0.5))
    assert kernels.use_int_mm_cpu(100, 64, 32) is True
    assert kernels.use_int_mm_cpu(120, 64, 32) is True  # same bucket (128): no new timing
    assert len(timed) == 2
    kernels.use_int_mm_cpu(300, 64, 32)
    assert len(timed) == 4
