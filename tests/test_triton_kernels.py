"""The Triton activation-quantization kernel (bitft/triton_kernels.py) against the torch path, bit for bit.

Runs the kernel on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported, in a fresh process so the rest of the suite is unaffected); skipped without triton.
On a CUDA machine the same checks run on the GPU too.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import sys, torch
    from bitft import kernels, triton_kernels
    dev = sys.argv[1]
    torch.manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(3, 5, 64), (7, 100), (2, 4100), (1, 1)]:
            x = (torch.randn(shape) * torch.logspace(-3, 2, shape[0]).view(-1, *[1] * (len(shape) - 1))).to(dtype)
            cases.append(x)
        x = torch.randn(4, 96).to(dtype)
        x[0] = 0  # the 1e-5 clamp
        x[1, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # ties at a = 1: round half to even
        x[2] = torch.arange(96) - 47.5
        cases.append(x)
        cases.append(torch.randn(64, 48).to(dtype).t())  # a strided view
    for x in cases:
        want = kernels.activation_codes(x)
        got = triton_kernels.activation_codes(x.to(dev))
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape, x.shape
        assert torch.equal(got[0].cpu(), want[0]), (x.dtype, x.shape)
        assert torch.equal(got[1].cpu(), want[1]), (x.dtype, x.shape)
    print("ok", len(cases))
""")


def run(dev, **env):
    e = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", CHECK, dev], capture_output=True, text=True, env=e, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_activation_kernel_is_bit_identical_in_the_interpreter():
    run("cpu", TRITON_INTERPRET="1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_activation_kernel_is_bit_identical_on_cuda():
    run("cuda")
