"""The fused selective-scan Triton kernel (``attnlab.kernels.ssd_scan``) vs the float64 sequential
reference: restarts, initial and final states, odd head dims and state sizes, several head-dim
blocks, fp32 inputs; its autograd gradients (the chunked path's); the dispatch's refusals; the
``SelectiveSSM`` block through the kernel. Without CUDA the kernel runs in Triton's CPU
interpreter on tiny shapes (conftest.py); with CUDA the same cases run compiled, plus bf16 and
larger GPU-only cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnlab[test]')")

from attnlab.kernels import ssd_scan  # noqa: E402
from attnlab.kernels.ssd_reference import selective_scan_reference  # noqa: E402
from attnlab.kernels.ssd_scan import selective_scan_fused, unsupported_reason  # noqa: E402
from attnlab.nn.ssm import SelectiveSSM  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
NAMES = ("x", "dt", "A", "Bm", "Cm", "D")


def _inputs(batch, length, heads, head_dim, d_state, *, seed, dtype=torch.float32, restart_p=0.2):
    """Scan arguments on DEVICE in ``dtype`` (A, D fp32), restart (B, T) and an fp32 initial state."""
    g = torch.Generator().manual_seed(seed)
    raw = {"x": torch.randn(batch, length, heads, head_dim, generator=g),
           "dt": F.softplus(torch.randn(batch, length, heads, generator=g) - 1.0),
           "A": -torch.rand(heads, generator=g) * 4 - 0.25,
           "Bm": torch.randn(batch, length, d_state, generator=g),
           "Cm": torch.randn(batch, length, d_state, generator=g),
           "D": torch.randn(heads, generator=g)}
    args = {k: v.to(DEVICE, dtype if v.dim() > 1 else torch.float32) for k, v in raw.items()}
    restart = (torch.rand(batch, length, generator=g) < restart_p).to(DEVICE)
    restart[0, 0] = False
    initial = torch.randn(batch, heads, head_dim, d_state, generator=g).to(DEVICE)
    return args, restart, initial


def _reference64(args, restart, initial):
    return selective_scan_reference(*(args[k].double() for k in NAMES), restart,
                                    initial_state=None if initial is None else initial.double(),
                                    return_final_state=True)


def _check(args, restart, initial, tol):
    y, final = selective_scan_fused(*(args[k] for k in NAMES), restart, initial_state=initial,
                                    return_final_state=True)
    y_ref, final_ref = _reference64(args, restart, initial)
    assert y.dtype == args["x"].dtype and final.dtype == torch.float32
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, atol=tol * scale, rtol=0)
    torch.testing.assert_close(final.double(), final_ref, atol=tol * final_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape", [(2, 9, 2, 5, 6), (1, 12, 3, 4, 16), (2, 1, 1, 3, 2)])
@pytest.mark.parametrize("with_initial", [False, True])
def test_kernel_equals_the_float64_reference(shape, with_initial):
    args, restart, initial = _inputs(*shape, seed=sum(shape))
    _check(args, restart, initial if with_initial else None, tol=1e-5)


def test_kernel_splits_head_dims_into_blocks(monkeypatch):
    monkeypatch.setattr(ssd_scan, "STATE_ELEMENTS", 16)  # d_state 6 -> BLOCK_N 8, BLOCK_P 2: 3 blocks of P = 5
    args, restart, initial = _inputs(2, 7, 2, 5, 6, seed=11)
    _check(args, restart, initial, tol=1e-5)


def test_kernel_reads_strided_inputs():
    """x, B, C as column slices of one projection (as the layer passes them)."""
    g = torch.Generator().manual_seed(2)
    batch, length, heads, head_dim, d_state = 2, 8, 2, 3, 4
    proj = torch.randn(batch, length, heads * head_dim + 2 * d_state, generator=g).to(DEVICE)
    x, Bm, Cm = torch.split(proj, [heads * head_dim, d_state, d_state], dim=-1)
    args, restart, _ = _inputs(batch, length, heads, head_dim, d_state, seed=3)
    args.update(x=x.unflatten(-1, (heads, head_dim)), Bm=Bm, Cm=Cm)
    assert not args["x"].is_contiguous()
    _check(args, restart.view(-1)[:length], None, tol=1e-5)  # and a (T,) restart shared by the batch


def test_kernel_gradients_are_the_reference_gradients():
    args, restart, initial = _inputs(2, 10, 2, 3, 4, seed=5)
    leaves = {k: v.clone().requires_grad_(True) for k, v in {**args, "initial_state": initial}.items()}
    y, final = selective_scan_fused(*(leaves[k] for k in NAMES), restart, initial_state=leaves["initial_state"],
                                    return_final_state=True)
    g = torch.Generator().manual_seed(6)
    gy, gf = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (y, final))
    grads = torch.autograd.grad((y, final), list(leaves.values()), (gy, gf))
    ref = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    y_ref, final_ref = selective_scan_reference(*(ref[k] for k in NAMES), restart, initial_state=ref["initial_state"],
                                                return_final_state=True)
    grads_ref = torch.autograd.grad((y_ref, final_ref), list(ref.values()), (gy.double(), gf.double()))
    for name, a, b in zip(leaves, grads, grads_ref):
        torch.testing.assert_close(a.double(), b, atol=1e-4 * b.abs().max().item(), rtol=0, msg=name)


def test_only_wanted_gradients_are_computed():
    args, restart, _ = _inputs(1, 6, 2, 3, 4, seed=7)
    x = args["x"].clone().requires_grad_(True)
    y = selective_scan_fused(x, *(args[k] for k in NAMES[1:]), restart)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_unsupported_reasons():
    x = torch.zeros(1, 2, 1, 4, device=DEVICE)
    assert unsupported_reason(x, 16) is None
    assert "float64" in unsupported_reason(x.double(), 16)
    assert "d_state" in unsupported_reason(x, ssd_scan.MAX_D_STATE + 1)


def test_ssm_block_through_the_kernel(monkeypatch):
    monkeypatch.setenv("ATTNLAB_KERNELS_ON_CPU", "1")  # "auto" takes the kernel on CPU tensors too (interpreter)
    torch.manual_seed(0)
    ssm = SelectiveSSM(16, d_state=4, num_heads=2).to(DEVICE)
    u = torch.randn(2, 9, 16, device=DEVICE)
    restart = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    restart[4] = True
    kernel, state_k = ssm(u, restart, scan="kernel", return_state=True)
    ref, state_r = ssm(u, restart, scan="reference", return_state=True)
    torch.testing.assert_close(kernel, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_k.ssm, state_r.ssm, atol=1e-5, rtol=1e-5)
    assert torch.equal(ssm(u, restart), kernel)
    kernel.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ssm.parameters())


# ------------------------------------------------------------------ compiled only
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_inputs_on_gpu(dtype):
    args, restart, initial = _inputs(3, 300, 8, 64, 128, seed=13, dtype=dtype, restart_p=0.01)
    _check(args, restart, initial, tol=2e-2)


@gpu
def test_kernel_large_fp32_on_gpu():
    args, restart, initial = _inputs(2, 1000, 4, 48, 64, seed=17, restart_p=0.005)
    _check(args, restart, initial, tol=1e-4)


@gpu
def test_ssm_block_under_autocast_on_gpu():
    torch.manual_seed(0)
    ssm = SelectiveSSM(128, d_state=64).cuda()
    u = torch.randn(2, 200, 128, device="cuda")
    restart = torch.arange(200, device="cuda") % 64 == 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = ssm(u, restart)
        chunked = ssm(u, restart, scan="chunked")
    torch.testing.assert_close(fused.float(), chunked.float(), atol=3e-2, rtol=3e-2)
