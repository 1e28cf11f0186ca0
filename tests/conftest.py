import pytest
import torch

from deqfusion_core import DEQFusion


def make_contractive(fusion: DEQFusion, scale: float = 0.2) -> DEQFusion:
    """Shrink the weights that feed back into the state, so that f is a contraction (the
    GroupNorms make f invariant to the scale of lin1, so lin2, gate and fuse are scaled)."""
    with torch.no_grad():
        for blk in fusion.blocks or []:
            blk.lin2.weight.mul_(scale)
        if fusion.fusion is not None:
            fusion.fusion.fuse.weight.mul_(scale)
            if fusion.fusion.gate is not None:
                fusion.fusion.gate.weight.mul_(scale)
    return fusion


def central_difference(loss, params, direction, h: float = 1e-6):
    """(loss(params + h d) - loss(params - h d)) / 2h, the parameters restored after each evaluation."""
    vals = []
    with torch.no_grad():
        for s in (h, -h):
            for p, d in zip(params, direction):
                p.add_(s * d)
            vals.append(loss())
            for p, d in zip(params, direction):
                p.sub_(s * d)
    return (vals[0] - vals[1]) / (2 * h)


@pytest.fixture
def contractive():
    return make_contractive


def inputs(dims, batch=4, dtype=torch.float32, requires_grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g, dtype=dtype).requires_grad_(requires_grad) for d in dims]
