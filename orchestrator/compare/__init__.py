"""``python -m orchestrator compare``: the papers' comparison table and figures from MLflow runs.

Rows are the runs of an MLflow experiment, or the child runs of a sweep's parent run. Columns, as in
the papers' tables: method, variant, trainable backbone parameters (and % of the backbone, i.e. of
full fine-tuning), peak training memory, seconds per iteration (each with its % of ``full`` when a
``full`` run is among the rows, else ``-``), then each task's figures where runs have them (its
``columns`` in ``orchestrator.tasks``): box and mask AP, mIoU/mAcc/aAcc, the headline ones with their
difference to ``full`` (or to the variant given as ``against``).

Runs that differ only by their seed (same setting, method, variant and hyperparameters) are one row
(``group_runs``): its figures are ``mean ± std`` over the seeds (sample standard deviation), ``n`` says
how many, a difference is one of means, and ``*`` marks one beyond two standard errors
(``sqrt(s1²/n1 + s2²/n2)``). With one seed per row the table is one run per row, without ``±``.

Two figures (PNG, and artifacts of the parent run when one is given), of the first headline figure
the runs have (box AP, mask AP, or mIoU):
- ``ap_vs_memory.png``: it against peak training memory, bubble area = trainable parameters
  (E3VA's Figure 1). Runs on CPU record no peak memory; the x axis is then seconds per iteration,
  and the figure says so.
- ``ap_heatmap.png``: it over two swept hyperparameters (LoRand's Figure 6).
Beside them ``table.txt`` and ``table.json`` (per row: its runs, each figure's mean, std and n, and each
difference with its standard error).
"""
from orchestrator.compare.command import compare_runs

__all__ = ["compare_runs"]
