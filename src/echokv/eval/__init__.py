"""Model-independent evaluation harness: RULER and LongBench samples, metrics, reports and plots.

* :mod:`echokv.eval.sample`: the :class:`~echokv.eval.sample.Sample` record and ``prompt_ids``.
* :mod:`echokv.eval.ruler`: RULER synthetic tasks (Hsieh et al. 2024) generated from a seed.
* :mod:`echokv.eval.longbench`: LongBench (Bai et al. 2023) from the official local JSONL files.
* :mod:`echokv.eval.metrics`: RULER / LongBench scoring, ``METRICS`` and ``score``.
* :mod:`echokv.eval.report` and :mod:`echokv.eval.plots`: ``results.json``, ``report.md``, figures.

Submodules are imported on demand (matplotlib only loads with the report).
"""
