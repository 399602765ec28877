"""``python -m histotransfer`` (also what ``torchrun -m histotransfer`` runs)."""

import sys

from .cli import main

sys.exit(main())
