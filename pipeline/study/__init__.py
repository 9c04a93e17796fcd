"""Experiments over the trainer: the clipping study (`satdet experiment clipping`).

- `plan.py`: what to run (strategies × learning rates × seeds, one step budget) and each run's config;
- `runner.py`: one training run (no export), its validation AP50, and the study loop that never lets one
  run's failure stop the others;
- `metrics.py`: per-run numbers from the trainer's telemetry (divergence, steps to a target loss, grad norms);
- `report.py`: results.csv, report.md (table, ranking, spread across seeds) and curves.png.
"""
