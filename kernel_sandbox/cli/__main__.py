"""``python -m kernel_sandbox.cli``: the same as the ``kernel-sandbox`` command."""

import sys

from kernel_sandbox.cli.app import main

sys.exit(main())
