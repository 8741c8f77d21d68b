"""Training: the LightningModules (``module``), their LR schedule, and the callbacks that the
configs always use (``mixup``, ``monitor``, ``guard``), plus ``diagnose`` (statistics at init)."""
