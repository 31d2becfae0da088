"""``python -m echokv``: the command line's entry point (part of the command line, not of the library)."""

import sys

from echokv import cli

sys.exit(cli.main())
