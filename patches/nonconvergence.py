"""Report DEQ solves that did not converge: a RuntimeWarning the first time and then every ``every`` times."""
from __future__ import annotations

import warnings


class NonConvergence:
    def __init__(self, what: str, every: int = 50):
        self.what, self.every, self.count = what, every, 0

    def check(self, stats) -> None:
        if stats.converged:
            return
        self.count += 1
        if self.count % self.every == 1:
            warnings.warn(f"{self.what} DEQ fusion did not converge ({self.count} forwards so far): relative residual "
                          f"{stats.rel_residual:.2e} after {stats.nstep} steps (f_tol={stats.tol})",
                          RuntimeWarning, stacklevel=3)
