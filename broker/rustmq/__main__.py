"""``python -m rustmq`` is the ``rustmq`` command."""

import sys

from rustmq.cli import main

sys.exit(main())
