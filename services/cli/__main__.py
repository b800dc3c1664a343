"""`python -m services.cli` is the same as the `dflash` command."""

import sys

from services.cli.main import main

sys.exit(main())
