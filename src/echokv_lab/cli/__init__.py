"""The harness's commands, added to the ``echokv`` command line through the ``echokv.commands`` entry point
(``pyproject.toml``): each module has ``HELP``, ``CONFIGS`` and ``run(args)``, like :mod:`echokv.cli`'s own."""
