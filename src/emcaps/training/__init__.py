"""Training: loop.py (the one loop: `train`, `resume`, callbacks), checkpoint.py (atomic, exact resume),
distributed.py (torchrun), build.py (model, optimiser, schedules and loss of a RunConfig), divergence.py
(NaN diagnosis) and log.py (log.jsonl).

Import from the modules; this package imports nothing, so that evaluation can use checkpoints while the
loop uses evaluation without a cycle."""
