"""How contractive f is at its fixed point: a per-sample estimate of the spectral radius of df/dz at z*.

Plain fixed-point iteration converges locally iff the spectral radius rho(J), J = df/dz(z*), is < 1; Anderson
and Broyden can reach fixed points with rho >= 1, but such a fixed point is unstable for plain iteration and
the implicit backward's fixed-point solve g = g J + grad is then not contractive either.

:func:`spectral_radius` runs power iteration on the vector-Jacobian product v -> v J (J^T has J's eigenvalues)
and reads the growth rate of ||v|| over the last half of the iterations (Gelfand's formula
rho = lim ||v J^k||^(1/k)). J is block-diagonal over samples (GroupNorm and the gates act per sample), so one
batched power iteration gives one estimate per sample. With a complex pair of dominant eigenvalues the norm
oscillates but its mean growth rate still tends to |lambda|. On a strongly non-normal J a short run can be off
either way (transient growth); the error shrinks like 1/iters.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["spectral_radius", "NotContractiveWarning", "warn_if_not_contractive"]


class NotContractiveWarning(UserWarning):
    """The spectral radius estimate of df/dz at the fixed point is >= 1 for some sample."""


def spectral_radius(layer, z_star: torch.Tensor, inj, iters: int = 20,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample estimate [B] of the spectral radius of J = d layer(z, inj) / dz at ``z_star`` [B, L].

    ``layer(z, inj)`` is f (e.g. ``DEQFusion.layer``). Runs ``iters`` vector-Jacobian products from a random
    unit vector per sample (``generator``: its seed), normalising after each; the result is the geometric mean
    of the per-step growth over the last half of the steps. No gradient reaches f's parameters. Detached.
    """
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters: must be an int >= 1, got {iters!r}")
    if not isinstance(z_star, torch.Tensor) or z_star.dim() != 2:
        raise ValueError(f"z_star: expected a state tensor [B, L], got "
                         f"{list(z_star.shape) if isinstance(z_star, torch.Tensor) else type(z_star).__name__}")
    with torch.enable_grad():
        z = z_star.detach().requires_grad_()
        fz = layer(z, inj)
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    v = v / v.norm(dim=1, keepdim=True)
    logs = []
    for _ in range(iters):
        (v,) = torch.autograd.grad(fz, z, v, retain_graph=True)
        n = v.norm(dim=1, keepdim=True)
        logs.append(n[:, 0].log())
        v = v / n.clamp_min(torch.finfo(n.dtype).tiny)
    return torch.stack(logs[iters // 2:]).mean(0).exp().detach()


def warn_if_not_contractive(rho: torch.Tensor, stacklevel: int = 2) -> None:
    """:class:`NotContractiveWarning` when the largest estimate in ``rho`` is >= 1."""
    if rho.numel() == 0:
        return
    top = float(rho.max())
    if top >= 1:
        n = int((rho >= 1).sum())
        warnings.warn(
            f"DEQ fusion is not contractive at its fixed point: spectral radius of df/dz estimated at {top:.3f} "
            f"(>= 1 on {n}/{rho.numel()} samples, median {float(rho.median()):.3f}). Plain fixed-point iteration "
            "will not converge there and the implicit backward solve may not either; try a larger jac_weight "
            "(or a jac_schedule), norm='contractive', a truncated backward (backward='phantom' or a smaller "
            "b_max_iter), or Anderson with more steps (f_max_iter, f_max_iter_eval).",
            NotContractiveWarning, stacklevel=stacklevel + 1)
