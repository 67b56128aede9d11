"""``python -m weightzoo.cli``: the same as the ``weightzoo`` command."""

import sys

from weightzoo.cli import main

sys.exit(main())
