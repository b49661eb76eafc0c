"""Local training: the deterministic inner-loop trainer, checkpoints, DiLoCo rounds and compression."""
