"""State Space Mixer (SSMix), UA-VLS paper section 3.3, equations 13-19.

SSMix mixes the text token sequence with a selective state-space scan (Mamba-style) and then re-samples the
token axis to the number of text tokens a decoder stage uses (24 -> 24 / 12 / 9 in the paper configuration).

The selective scan (eq. 18) runs on ``mamba_ssm``'s CUDA kernel when that package is importable and the input
is a CUDA tensor; everywhere else it runs :func:`selective_scan_torch`, a pure-PyTorch scan that is vectorised
over batch, channels and state size and loops over the (short) token axis.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["selective_scan_torch", "selective_scan", "mamba_kernel", "SSMix"]

logger = logging.getLogger("vlseg")

_MAMBA = None


def mamba_kernel():
    """``mamba_ssm``'s ``selective_scan_fn`` or ``None`` when the package (a GPU-only extra) is not importable.

    The first call logs which scan runs on CUDA tensors: the kernel, or the PyTorch scan and why."""
    global _MAMBA
    if _MAMBA is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            _MAMBA = selective_scan_fn
            logger.info("UA-VLS SSMix: selective scan runs mamba_ssm's CUDA kernel (selective_scan_fn)")
        except ModuleNotFoundError as err:
            _MAMBA = False
            logger.info("UA-VLS SSMix: mamba_ssm is not installed (%s); the selective scan runs the PyTorch "
                        "implementation (same result, slower)", err)
        except Exception as err:  # noqa: BLE001 - an installed package whose CUDA extension fails to load
            _MAMBA = False
            logger.warning("UA-VLS SSMix: mamba_ssm is installed but fails to import (%s: %s); the selective scan "
                           "runs the PyTorch implementation (same result, slower)", type(err).__name__, err)
    return _MAMBA or None


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective state-space scan (eq. 17-18) in plain PyTorch; same arguments and result as mamba_ssm's kernel.

    For every batch ``b``, channel ``d`` and state ``n``, with ``dt = softplus(delta + delta_bias)`` (eq. 17)::

        h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B[b, n, t] * u[b, d, t]      (h_0 = 0)
        y_t = sum_n C[b, n, t] * h_t[n] + D[d] * u[b, d, t]

    Shapes: ``u``, ``delta``: [B, D, L]; ``A``: [D, N] (diagonal transition, one row per channel); ``B``, ``C``:
    [B, N, L] (input-dependent); ``D``: [D] (learned skip); returns ``y`` [B, D, L] in ``u``'s dtype.
    """
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # time-major [L, B, D, N] so that the loop reads whole slices (cheap backward through unbind/stack)
    decay = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :]).permute(2, 0, 1, 3)
    drive = ((delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)).permute(2, 0, 1, 3)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    states = []
    for a_t, b_t in zip(decay.unbind(0), drive.unbind(0)):
        h = a_t * h + b_t
        states.append(h)
    y = torch.einsum("lbdn,bnl->bdl", torch.stack(states, dim=0), C)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    return y.to(dtype)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, use_kernel: bool = True):
    """Eq. 18: dispatch to ``mamba_ssm.selective_scan_fn`` (CUDA tensors, package installed) or the PyTorch scan."""
    kernel = mamba_kernel() if use_kernel and u.is_cuda else None
    if kernel is not None:
        return kernel(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                      None if D is None else D.float(), z=None,
                      delta_bias=None if delta_bias is None else delta_bias.float(), delta_softplus=delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)


class SSMix(nn.Module):
    """State Space Mixer (eq. 13-19): ``[B, N_in, d_model] -> [B, N_out, d_model]``.

    Args:
        d_model: token width (the decoder stage's channel count C_i; the text is projected to it first, eq. 3).
        in_tokens / out_tokens: length of the text sequence in and out; the final projection (eq. 19) acts on the
            TOKEN axis, as in the public code (24 -> 24 / 12 / 9).
        d_state: state size N of the scan (16). d_conv: depthwise kernel (4, 'same' padding).
        expand: gamma of eq. 13, ``d_inner = expand * d_model``; the in-projection gives ``2 * d_inner`` channels
            split into the scan branch P and the gate branch Q. The public code projects C -> C and splits it in
            halves, i.e. gamma = 0.5; since eq. 19 projects only the token axis, ``Concat(SCAN, Q~)`` must have
            d_model channels, so gamma = 0.5 is the only consistent value (checked).
        dt_rank: rank of the Delta projection, ``ceil(d_model / 16)`` when "auto".
        dt_min / dt_max / dt_init_floor: range of the initial step sizes (the bias of the Delta projection holds
            ``softplus^-1(dt)``, the "log-transformed initialisation" of eq. 17).
        use_kernel: allow the mamba_ssm CUDA kernel when available.
        delta_bias_twice: add the Delta bias twice, as the public code does (its ``dt_proj`` Linear adds the bias
            and the scan adds it again through ``delta_bias``), i.e. ``softplus(W dt + 2 bias)``. Default
            ``False``: once, as eq. 17 and Mamba (``softplus(W dt + bias)``).
    """

    def __init__(self, d_model: int, in_tokens: int = 24, out_tokens: int = 24, d_state: int = 16, d_conv: int = 4,
                 expand: float = 0.5, dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, use_kernel: bool = True, delta_bias_twice: bool = False):
        super().__init__()
        self.d_model, self.d_state = int(d_model), int(d_state)
        self.d_inner = int(round(expand * d_model))
        if 2 * self.d_inner != self.d_model:
            # Concat(SCAN, Q~) must come back with d_model channels: eq. 19 projects the token axis only.
            raise ValueError(f"SSMix needs 2 * expand * d_model == d_model (got expand={expand}, d_model={d_model})")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_tokens, self.out_tokens = int(in_tokens), int(out_tokens)
        self.use_kernel = bool(use_kernel)
        self.delta_bias_twice = bool(delta_bias_twice)
        # eq. 13: T_H = Linear(T') with 2 * d_inner channels
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # eq. 15: depthwise Conv1D on each branch, then tanh
        # ('same' padding as in the public code, written out: left (k-1)//2, right the rest, like torch's 'same')
        self.conv_pad = ((d_conv - 1) // 2, d_conv - 1 - (d_conv - 1) // 2)
        self.conv_p = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=False)
        self.conv_q = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=False)
        # eq. 16: [Delta, B, C] = Split(Linear(P~)); Delta goes through a low-rank projection (dt_proj)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # eq. 18: diagonal A = -exp(A_log) (S4D-real initialisation 1..N) and the learned skip D (the paper's E)
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        # eq. 19: Linear over the token axis of Concat(SCAN, Q~), without bias (public code)
        self.out_proj = nn.Linear(self.in_tokens, self.out_tokens, bias=False)
        self._init_dt(dt_min, dt_max, dt_init_floor)

    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if text.shape[1] != self.in_tokens:
            raise ValueError(f"SSMix expects {self.in_tokens} tokens, got {text.shape[1]}")
        th = self.in_proj(text)  # eq. 13: [B, N, 2*d_inner]
        p, q = th.transpose(1, 2).chunk(2, dim=1)  # eq. 14: each [B, d_inner, N]
        p = torch.tanh(self.conv_p(F.pad(p, self.conv_pad)))  # eq. 15
        q = torch.tanh(self.conv_q(F.pad(q, self.conv_pad)))
        dbc = self.x_proj(p.transpose(1, 2))  # eq. 16: [B, N, dt_rank + 2 d_state]
        dt, b, c = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # [B, d_inner, N]; the bias is added in eq. 17 (once more here with delta_bias_twice, as the public code)
        delta = F.linear(dt, self.dt_proj.weight, self.dt_proj.bias if self.delta_bias_twice else None).transpose(1, 2)
        scan = selective_scan(p, delta, -torch.exp(self.A_log.float()), b.transpose(1, 2).contiguous(),
                              c.transpose(1, 2).contiguous(), self.D, delta_bias=self.dt_proj.bias,
                              delta_softplus=True, use_kernel=self.use_kernel)  # eq. 17-18
        y = torch.cat([scan, q], dim=1)  # [B, 2*d_inner, N]
        return self.out_proj(y).transpose(1, 2)  # eq. 19: [B, N_out, 2*d_inner]
