"""``python -m capkeeper``."""

import sys

from capkeeper.cli import main

sys.exit(main())
