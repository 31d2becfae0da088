"""echokv's evaluation harness: the methods compared at equal KV memory (EchoKV and the baselines), the suites and
their runner, the speed benchmark, the referee's and the similarity analyses, and their commands (``echokv eval``,
``bench``, ``analyze``, registered on the ``echokv`` command line through the ``echokv.commands`` entry point).

The library (:mod:`echokv`) never imports this package; it installs and runs without it.
"""
