"""`python -m dpt_lab ...`: see dpt_lab/cli.py."""

import sys

from .cli import main

sys.exit(main())
