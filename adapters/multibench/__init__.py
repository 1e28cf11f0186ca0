"""DEQ fusion for MultiBench (pliang279/MultiBench, a git checkout the user keeps; never copied).

    from deqfusion_adapters.multibench import create, list_fusions, deq_train_kwargs
    fusion = create("deq", [512, 512], dim=512)          # or any MultiBench fusion by name
    train(encoders, fusion, Linear(fusion.output_dim, 23), ..., **deq_train_kwargs(fusion))

Modules: ``registry`` (fusions by name), ``training`` (Jacobian term, fusion learning rate, MultiBench's MM-IMDB
recipe and the paper's DEQ recipe for MultiBench's unmodified ``train``), ``mmimdb`` and ``mogonet`` (data sets),
``runner`` (train and test one fusion), ``checkout``
(finding the checkout), ``plugin`` (``deqfusion run multibench``). Shims: ``deqfusion_compat.multibench``.
"""
from .checkout import MultiBenchNotFound, find_checkout, import_multibench, use_checkout
from .registry import MultiBenchDEQ, create, get, list_fusions, register_fusion
from .training import DEQObjective, FusionLR, deq_train_kwargs, train_mmimdb

__all__ = ["create", "get", "list_fusions", "register_fusion", "MultiBenchDEQ", "MultiBenchNotFound",
           "find_checkout", "import_multibench", "use_checkout",
           "DEQObjective", "FusionLR", "deq_train_kwargs", "train_mmimdb"]
