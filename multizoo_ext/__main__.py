"""``python -m multizoo_ext`` runs the CLI."""
import sys

from multizoo_ext.cli import main

sys.exit(main())
