"""deqfusion integrations that patch an upstream training script in memory (installed as deqfusion_patches)."""
