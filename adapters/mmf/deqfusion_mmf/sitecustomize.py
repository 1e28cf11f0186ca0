"""For MMF on a current Python/torch stack (1.0.0rc10, or git main), where `import mmf` itself fails before MMF
reads env.user_dir: with this folder on PYTHONPATH, Python runs this file at start-up, which installs deqfusion's
import hook (the shims apply when `mmf` is first imported, and only those needed); then it runs the
sitecustomize this file shadows, if any."""
import importlib.machinery
import importlib.util
import os
import sys

try:
    from deqfusion_adapters.mmf.flavour import install_shims

    install_shims()
except ImportError:  # deqfusion not importable from this interpreter: leave it alone
    pass

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
