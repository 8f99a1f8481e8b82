"""``python -m resgeom_fast``: the ``resgeom`` command."""
import sys

from resgeom_fast.cli import main

sys.exit(main())
