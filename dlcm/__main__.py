"""``python -m dlcm`` is the ``dlcm`` console script."""

import sys

from dlcm.cli import main

sys.exit(main())
