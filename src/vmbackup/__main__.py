"""`python -m vmbackup`: the same as running vmbackup.py."""

import sys

from vmbackup.cli import main

sys.exit(main())
