"""Conditional compatibility shims, one module per upstream (``common`` for those several share), registered
with ``deqfusion_core.compat`` when the module is imported. Installed as ``deqfusion_compat``."""
