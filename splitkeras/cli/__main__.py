"""`python -m splitkeras.cli ...` is the `splitkeras` command."""

import sys

from splitkeras.cli import main

sys.exit(main())
