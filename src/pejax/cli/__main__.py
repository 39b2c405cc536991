"""``python -m pejax.cli``: the same as the ``pejax`` console script."""

import sys

from pejax.cli import main

sys.exit(main())
