"""The selective SSM with restarts: the chunked SSD form vs the sequential loop (outputs, final
states, gradients), restarts that isolate segments (scan, conv, whole block), the segmented conv
vs a hand loop, token-by-token ``step`` vs ``forward``, and bad widths. float64 on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.nn.ssm import (SSMState, SelectiveSSM, causal_conv_segmented, selective_scan_chunked,
                            selective_scan_reference)

F64 = torch.float64


def scan_inputs(batch, length, heads, head_dim, d_state, *, seed, restart_p=0.15, with_initial=False):
    """Random scan arguments (float64, requiring grad) and the restart mask."""
    g = torch.Generator().manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)
    tensors = {
        "x": rand(batch, length, heads, head_dim),
        "dt": F.softplus(rand(batch, length, heads) - 1.0),
        "A": -torch.rand(heads, generator=g, dtype=F64) * 4 - 0.25,
        "Bm": rand(batch, length, d_state),
        "Cm": rand(batch, length, d_state),
        "D": rand(heads),
    }
    if with_initial:
        tensors["initial_state"] = rand(batch, heads, head_dim, d_state)
    for t in tensors.values():
        t.requires_grad_(True)
    restart = torch.rand(batch, length, generator=g) < restart_p
    restart[0, 0] = False  # an initial state flows in (when given) for sequence 0
    return tensors, restart


def _scan(fn, tensors, restart, **kw):
    args = [tensors[k] for k in ("x", "dt", "A", "Bm", "Cm", "D")]
    return fn(*args, restart, initial_state=tensors.get("initial_state"), return_final_state=True, **kw)


@pytest.mark.parametrize("length,chunk,with_initial", [(1, 8, False), (29, 8, True), (32, 16, False),
                                                       (45, 16, True), (20, 64, True)])
def test_chunked_scan_equals_the_sequential_loop(length, chunk, with_initial):
    tensors, restart = scan_inputs(2, length, 3, 4, 5, seed=length, with_initial=with_initial)
    (y_ref, final_ref), (y, final) = (_scan(selective_scan_reference, tensors, restart),
                                      _scan(selective_scan_chunked, tensors, restart, chunk=chunk))
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=0)
    g = torch.Generator().manual_seed(1)
    gy, gf = torch.randn(y.shape, generator=g, dtype=F64), torch.randn(final.shape, generator=g, dtype=F64)
    names = list(tensors)
    grads_ref = torch.autograd.grad((y_ref, final_ref), [tensors[n] for n in names], (gy, gf))
    grads = torch.autograd.grad((y, final), [tensors[n] for n in names], (gy, gf))
    for name, a, b in zip(names, grads, grads_ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)


def test_restart_at_zero_ignores_the_initial_state_and_none_forces_it():
    tensors, restart = scan_inputs(1, 12, 2, 3, 4, seed=3, with_initial=True)
    restart[:, 0] = True
    y_init, _ = _scan(selective_scan_chunked, tensors, restart, chunk=8)
    del tensors["initial_state"]
    restart[:, 0] = False
    y_none, _ = _scan(selective_scan_chunked, tensors, restart, chunk=8)
    torch.testing.assert_close(y_init, y_none, atol=1e-12, rtol=0)


def test_long_decays_and_many_restarts_stay_finite():
    tensors, restart = scan_inputs(1, 300, 2, 2, 3, seed=4, restart_p=0.5)
    with torch.no_grad():
        tensors["dt"].mul_(50.0)  # exp(dt * A) underflows; cumulative log decays reach -1e5
    y, final = _scan(selective_scan_chunked, tensors, restart, chunk=64)
    y_ref, _ = _scan(selective_scan_reference, tensors, restart)
    (y.square().sum() + final.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in tensors.values())
    torch.testing.assert_close(y, y_ref, atol=1e-9, rtol=0)


def _perturbed_before(tensor, start, seed):
    g = torch.Generator().manual_seed(seed)
    out = tensor.detach().clone()
    out[:, :start] += torch.randn(out[:, :start].shape, generator=g, dtype=out.dtype)
    return out


@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan_reference])
def test_scan_restart_hides_every_earlier_token(fn):
    tensors, restart = scan_inputs(2, 26, 2, 3, 4, seed=5, restart_p=0.0, with_initial=True)
    start = 11
    restart[:, start] = True
    y, _ = _scan(fn, tensors, restart)
    changed = dict(tensors)
    for name in ("x", "Bm", "Cm"):
        changed[name] = _perturbed_before(tensors[name], start, seed=len(name))
    changed["dt"] = _perturbed_before(tensors["dt"], start, seed=9).abs()
    changed["initial_state"] = tensors["initial_state"] + 1.0
    y2, _ = _scan(fn, changed, restart)
    assert torch.equal(y[:, start:], y2[:, start:])
    assert not torch.allclose(y[:, :start], y2[:, :start])


def _conv_loop(x, weight, bias, restart, initial_state):
    """out[b, t] by the definition: inputs t-j (j < W) of the same segment, the initial state's
    inputs while no restart lies in [0, t]."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    history = torch.cat([initial_state.transpose(1, 2), x], dim=1)  # position p at index p + W - 1
    out = torch.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            out[b, t] = bias
            for j in range(width):
                if restart[b, max(t - j + 1, 0):t + 1].any():
                    break
                out[b, t] += weight[:, width - 1 - j] * history[b, t - j + width - 1]
    return out


@pytest.mark.parametrize("length", [2, 17])
def test_segmented_conv_equals_a_hand_loop(length):
    g = torch.Generator().manual_seed(length)
    batch, channels, width = 2, 5, 4
    x = torch.randn(batch, length, channels, generator=g, dtype=F64)
    weight, bias = torch.randn(channels, width, generator=g, dtype=F64), torch.randn(channels, generator=g, dtype=F64)
    initial = torch.randn(batch, channels, width - 1, generator=g, dtype=F64)
    restart = torch.rand(batch, length, generator=g) < 0.2
    restart[0, 0] = False
    out, state = causal_conv_segmented(x, weight, bias, restart, initial_state=initial, return_final_state=True)
    torch.testing.assert_close(out, _conv_loop(x, weight, bias, restart, initial), atol=1e-12, rtol=0)
    # the state is what a following chunk needs: the conv of the sequence continued equals the conv of both
    more = torch.randn(batch, 6, channels, generator=g, dtype=F64)
    no_restart = torch.zeros(batch, 6, dtype=torch.bool)
    both = causal_conv_segmented(torch.cat([x, more], 1), weight, bias, torch.cat([restart, no_restart], 1),
                                 initial_state=initial)
    tail = causal_conv_segmented(more, weight, bias, no_restart, initial_state=state)
    torch.testing.assert_close(tail, both[:, length:], atol=1e-12, rtol=0)


def test_conv_without_restarts_is_torch_conv1d():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*s, generator=g, dtype=F64) for s in ((2, 9, 3), (3, 4), (3,)))
    expected = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=3)[..., :9].transpose(1, 2)
    torch.testing.assert_close(causal_conv_segmented(x, weight, bias, torch.zeros(9, dtype=torch.bool)), expected)


def _module(seed=0, **kw):
    torch.manual_seed(seed)
    return SelectiveSSM(32, d_state=6, num_heads=4, expand=2, **kw).to(F64)


def test_module_restart_hides_every_earlier_token():
    ssm = _module()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 21, 32, generator=g, dtype=F64)
    restart = torch.zeros(21, dtype=torch.bool)
    restart[[5, 13]] = True
    with torch.no_grad():
        y = ssm(u, restart)
        y2 = ssm(_perturbed_before(u, 13, seed=2), restart)
    assert torch.equal(y[:, 13:], y2[:, 13:])
    assert not torch.allclose(y[:, 5:13], y2[:, 5:13])


def test_module_scans_agree():
    ssm = _module(conv_width=3)
    u = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(3), dtype=F64)
    restart = torch.rand(2, 19, generator=torch.Generator().manual_seed(4)) < 0.2
    with torch.no_grad():
        ref = ssm(u, restart, scan="reference")
        torch.testing.assert_close(ssm(u, restart, scan="chunked"), ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(ssm(u, restart), ref, atol=1e-10, rtol=0)


def test_step_equals_forward_and_continues_a_prefix():
    ssm = _module()
    batch, length, prefix = 2, 23, 9
    u = torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(5), dtype=F64)
    restart = torch.rand(batch, length, generator=torch.Generator().manual_seed(6)) < 0.2
    with torch.no_grad():
        full, full_state = ssm(u, restart, return_state=True)
        state = ssm.zero_state(batch)
        stepped = torch.stack([ssm.step(u[:, t], state, restart[:, t]) for t in range(length)], dim=1)
        torch.testing.assert_close(stepped, full, atol=1e-10, rtol=0)
        torch.testing.assert_close(state.ssm, full_state.ssm, atol=1e-10, rtol=0)
        torch.testing.assert_close(state.conv, full_state.conv, atol=1e-10, rtol=0)

        head, state = ssm(u[:, :prefix], restart[:, :prefix], return_state=True)
        rest = [ssm.step(u[:, t], state, restart[:, t]) for t in range(prefix, length)]
        torch.testing.assert_close(torch.cat([head, torch.stack(rest, 1)], 1), full, atol=1e-10, rtol=0)


def test_state_shapes_and_in_place_update():
    ssm = _module()
    state = SSMState.zeros(3, ssm, "cpu")
    assert state.conv.shape == (3, ssm.conv_dim, 3) and state.ssm.shape == (3, 4, 16, 6)
    assert state.ssm.dtype == F64
    conv, mem = state.conv, state.ssm
    with torch.no_grad():
        ssm.step(torch.randn(3, 32, dtype=F64), state, torch.zeros(3, dtype=torch.bool))
    assert state.conv is conv and state.ssm is mem and mem.abs().sum() > 0


def test_bf16_autocast_forward_runs():
    torch.manual_seed(0)
    ssm = SelectiveSSM(32)
    u = torch.randn(1, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssm(u, torch.zeros(10, dtype=torch.bool))
    assert y.shape == u.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ssm(u, torch.zeros(10, dtype=torch.bool)), atol=0.1, rtol=0.1)


def test_init_follows_mamba2_and_is_seeded():
    ssm = _module(dt_min=1e-3, dt_max=1e-1)
    dt = F.softplus(ssm.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-9)).all() and (dt <= 1e-1 * (1 + 1e-9)).all()
    A = -torch.exp(ssm.A_log)
    assert (A <= -1).all() and (A >= -16).all() and torch.equal(ssm.D, torch.ones(4, dtype=F64))
    again = _module(dt_min=1e-3, dt_max=1e-1)
    assert all(torch.equal(a, b) for a, b in zip(ssm.state_dict().values(), again.state_dict().values()))
    torch.manual_seed(0)
    ssm.reset_parameters()
    assert not torch.equal(ssm.dt_bias, again.dt_bias) or not torch.equal(ssm.A_log, again.A_log)


def test_bad_widths_raise_value_error_naming_them():
    with pytest.raises(ValueError, match=r"48.*num_heads = 5"):
        SelectiveSSM(48, num_heads=5)
    with pytest.raises(ValueError, match="scan must be one of"):
        _module()(torch.zeros(1, 2, 32, dtype=F64), torch.zeros(2, dtype=torch.bool), scan="fast")
