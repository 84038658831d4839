"""`python -m tensorpress ...` is the `tensorpress` command."""

import sys

from tensorpress.cli import main

sys.exit(main())
