"""``python -m runrelay.daemon.cli``: the ``runrelay`` command."""

import sys

from runrelay.daemon.cli import main

sys.exit(main())
