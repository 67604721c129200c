"""`python -m fedtune_trainer` is `fedtune-trainer`."""

import sys

from .cli import main

sys.exit(main())
