"""`python -m mocosfl ...` = the `mocosfl` command."""

import sys

from mocosfl.cli import main

sys.exit(main())
