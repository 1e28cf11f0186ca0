"""Hand-fused CPU kernels for the group norms of f in solver steps (issue 14: f at its floor on the CPU), for their
VJPs in the implicit backward's steps (``gn_backward``, used by :mod:`~deqfusion_core.vjp`), and for the solvers'
per-step bookkeeping (``residual``, ``copy_rows``: see their docstrings).

In a solver step f runs without autograd; there each group norm of f with what surrounds it (the Linear's bias or
the injected input before it, the ReLUs and the residual around it, and in f_i's tail the second norm) is one
pass over memory in ``_kernels.c`` instead of four to six torch ops (torch's CPU group norm reads and writes its
input several times, and each op costs a dispatch). The C source is compiled on first use with the system C
compiler (``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``) into ``$DEQFUSION_CACHE`` (default
``~/.cache/deqfusion``), keyed by the source, the flags and the CPU, and loaded with ctypes; OpenMP threads follow
``torch.get_num_threads()``. Used only for float32 CPU tensors without autograd; everything else (float64, CUDA,
f under autograd (the application at z* whose graph the parameters' gradient and the Jacobian term go through), a
missing compiler, ``DEQFUSION_KERNELS=0``) runs the torch ops of
:mod:`~deqfusion_core.fusion_map`, to which the kernels are equal within float32 rounding
(tests/test_kernels.py). ``status()`` says which path runs and why.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["status", "usable", "torch_ops", "gn_fused", "gn_backward", "residual", "copy_rows"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared"]
_STATE: dict = {}     # "lib": the loaded library or None, "why": the reason when None
_OFF = [0]            # torch_ops() nesting depth


def cpu_info() -> dict:
    """The first processor's entries of /proc/cpuinfo ({} where there is none): its model name and flags."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def _cpu_id() -> str:
    return cpu_info().get("flags") or platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    source = _SOURCE.read_bytes()
    key = hashlib.sha1(b"\0".join([source, " ".join([cc, *_FLAGS]).encode(), platform.machine().encode(),
                                   _cpu_id().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("DEQFUSION_CACHE", Path.home() / ".cache" / "deqfusion"))
    lib = cache / f"kernels-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out, errors = Path(tmp) / "k.so", []
            for openmp in (["-fopenmp"], []):     # without OpenMP the kernels run on one thread
                cmd = [cc, *_FLAGS, *openmp, str(_SOURCE), "-o", str(out), "-lm"]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise RuntimeError(f"C compiler {cc!r} could not run: {e}") from None
                if done.returncode == 0:
                    break
                errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
            else:
                raise RuntimeError(f"{' '.join(cmd)} failed: {errors}")
            os.replace(out, lib)     # atomic: concurrent first uses each build, one wins
    dll = ctypes.CDLL(str(lib))
    L, P, F, I = ctypes.c_long, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    dll.gn_fused.argtypes = [L, L, L, L, P, L, L, P, L, L, P, P, L, P, L, L, P, P, P, L, L, F, I, I, I]
    dll.gn_fused.restype = None
    dll.gn_backward.argtypes = [L, L, L, L, P, L, L, P, L, L, P, L, L, P, L, L, P, P, L, P, L, L, P, L, L, I]
    dll.gn_backward.restype = None
    dll.residual.argtypes = [L, L, P, L, P, L, P, L, P, L, P, P, I]
    dll.residual.restype = None
    dll.copy_rows.argtypes = [L, L, P, L, P, P, P, L, I]
    dll.copy_rows.restype = None
    return dll


def _lib():
    if "lib" not in _STATE:
        if os.environ.get("DEQFUSION_KERNELS", "1") == "0":
            _STATE.update(lib=None, why="DEQFUSION_KERNELS=0")
        else:
            try:
                _STATE.update(lib=_build(), why=None)
            except (OSError, RuntimeError) as e:
                _STATE.update(lib=None, why=f"not built ({e}); f runs torch ops")
    return _STATE["lib"]


def status() -> str:
    """Which path f's solver steps take on the CPU, and why."""
    return "fused C kernels (float32, CPU, no autograd)" if _lib() is not None else f"torch ops: {_STATE['why']}"


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels apply to an f on ``x`` now: float32 on the CPU, no autograd, not being compiled."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not _OFF[0] and _lib() is not None)


@contextlib.contextmanager
def torch_ops():
    """Within it the kernels do not apply (f, its hand-derived VJP and the solvers' bookkeeping run torch ops and
    autograd), e.g. to build a benchmark problem whose weights do not depend on the kernels' rounding."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def _strided(t: torch.Tensor | None):
    """(pointer, matrix stride, row stride) of a [M, R, C] view, a [R, C] one (M = 1), or a channel vector [C] /
    [M, 1, C] broadcast over rows (row stride 0)."""
    if t is None:
        return None, 0, 0
    if t.stride(-1) != 1:
        raise ValueError("gn_fused: channels must be contiguous")
    if t.dim() == 1:
        return t.data_ptr(), 0, 0
    if t.dim() == 2:
        return t.data_ptr(), 0, t.stride(0)
    return t.data_ptr(), t.stride(0), 0 if t.shape[1] == 1 else t.stride(1)


def gn_fused(x, groups: int, eps: float, weight, bias, *, add=None, pre=False, res=None, post=False, weight3=None,
             bias3=None, out=None):
    """``out`` = GN(post(GN(pre(x + add)) * weight + bias + res)) * weight3 + bias3, the second norm only when
    ``weight3`` is given (see _kernels.c), on [R, C] or [M, R, C] views whose channels are contiguous; channel
    parameters [C] or [M, 1, C] (contiguous). ``out`` defaults to x (in place). Callers check :func:`usable`."""
    out = x if out is None else out
    M, R, C = (1, *x.shape) if x.dim() == 2 else x.shape
    params = [p.contiguous() for p in (weight, bias)]
    ps0 = C if params[0].dim() == 3 else 0
    tail = [None, None] if weight3 is None else [p.contiguous() for p in (weight3, bias3)]
    ptr = lambda t: None if t is None else t.data_ptr()
    _lib().gn_fused(M, R, C, groups, *_strided(x), *_strided(add), ptr(params[0]), ptr(params[1]), ps0,
                    *_strided(res), ptr(tail[0]), ptr(tail[1]), *_strided(out), eps, int(pre), int(post),
                    torch.get_num_threads())
    return out


def gn_backward(v, xh, rstd, weight, *, add=None, pre_mask=None, post_mask=None, out=None):
    """The VJP of y = GN(u) * weight + b at u (normalised ``xh``, ``rstd`` [..., R, G] contiguous), given the
    cotangent ``v`` (+ ``add``), with ReLU masks around it: ``out`` = post(GN'(pre(v + add) * weight)), pre / post
    zeroing where ``pre_mask`` / ``post_mask`` <= 0 (see _kernels.c). [R, C] or [M, R, C] views with contiguous
    channels (``add`` [R, C]: the same for every matrix); ``weight`` [C] or [M, 1, C]. ``out`` defaults to v (in
    place). Callers check :func:`usable`."""
    out = v if out is None else out
    M, R, C = (1, *v.shape) if v.dim() == 2 else v.shape
    weight, rstd = weight.contiguous(), rstd.contiguous()
    (ap, as0, as1), (pp, ps0, ps1), (qp, qs0, qs1) = (_strided(t) for t in (add, pre_mask, post_mask))
    _lib().gn_backward(M, R, C, rstd.shape[-1], *_strided(v), ap, as0, as1, pp, ps0, ps1, *_strided(xh),
                       rstd.data_ptr(), weight.data_ptr(), C if weight.dim() == 3 else 0, qp, qs0, qs1, *_strided(out),
                       torch.get_num_threads())
    return out


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(pointer, row stride) of a [R, C] view with contiguous rows."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError("kernels: expected a [R, C] view with contiguous rows")
    return t.data_ptr(), t.stride(0)


def residual(fx: torch.Tensor, x: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None = None):
    """A solver step's residual in one pass: ``g`` = fx - x and (``f`` given) ``f`` = fx, written in place, and
    the row norms ``(||g||, ||fx||)`` returned ([R] each). Views with contiguous rows; callers check
    :func:`usable`."""
    R, C = fx.shape
    gn, fn = fx.new_empty(R), fx.new_empty(R)
    fp, fs = _rows(f) if f is not None else (None, 0)
    _lib().residual(R, C, *_rows(fx), *_rows(x), fp, fs, *_rows(g), gn.data_ptr(), fn.data_ptr(),
                    torch.get_num_threads())
    return gn, fn


def copy_rows(x: torch.Tensor, take: torch.Tensor, rows: torch.Tensor | None, best: torch.Tensor) -> None:
    """``best[rows[r]] = x[r]`` where ``take[r]`` (``rows`` None: ``best[r]``), in place: only the rows taken are
    read and written. Callers check :func:`usable`."""
    take = take.to(torch.uint8).contiguous()
    rows = None if rows is None else rows.to(torch.long).contiguous()
    _lib().copy_rows(x.shape[0], x.shape[1], *_rows(x), take.data_ptr(), None if rows is None else rows.data_ptr(),
                     *_rows(best), torch.get_num_threads())
