"""python -m cli: the cbir command."""

import sys

from cli.main import main

sys.exit(main())
