"""``python -m fxprefetch``: the command line."""

import sys

from fxprefetch.cli import main

sys.exit(main())
