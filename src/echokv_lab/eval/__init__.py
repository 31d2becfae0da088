"""Model-independent evaluation harness: RULER and LongBench samples, metrics, reports and plots.

* :mod:`echokv_lab.eval.sample`: the :class:`~echokv_lab.eval.sample.Sample` record and ``prompt_ids``.
* :mod:`echokv_lab.eval.ruler`: RULER synthetic tasks (Hsieh et al. 2024) generated from a seed.
* :mod:`echokv_lab.eval.longbench`: LongBench (Bai et al. 2023) from the official local JSONL files.
* :mod:`echokv_lab.eval.metrics`: RULER / LongBench scoring, ``METRICS`` and ``score``.
* :mod:`echokv_lab.eval.report` and :mod:`echokv_lab.eval.plots`: ``results.json``, ``report.md``, figures.

Submodules are imported on demand (matplotlib only loads with the report).
"""
