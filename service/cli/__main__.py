"""`python -m service.cli` runs the ntrain command line."""

import sys

from service.cli.app import main

sys.exit(main())
