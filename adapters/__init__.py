"""deqfusion integrations that register into a framework's own extension point (installed as deqfusion_adapters)."""
