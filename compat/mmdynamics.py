"""Shims of MM-Dynamics (TencentAILabHealthcare/mmdynamics) on a machine without a GPU."""
from __future__ import annotations

from deqfusion_core.compat import restore, shim, swap, use

from . import common

use("mmdynamics", common.cuda_on_cpu)     # train_test.train: model.cuda(), labels.cuda()


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@shim("mmdynamics", "the released checkpoints were saved from CUDA tensors: without a GPU, load_checkpoint maps "
      "them to the CPU", needed=_no_cuda, undo=lambda train_test: restore(train_test, "load_checkpoint"),
      name="load_checkpoint->cpu")
def load_checkpoint_on_cpu(train_test):
    import torch

    def load_checkpoint(model, path):
        model.load_state_dict(torch.load(path, map_location="cpu"))

    swap(train_test, "load_checkpoint", load_checkpoint)
