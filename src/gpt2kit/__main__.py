"""`python -m gpt2kit ...` (and `torchrun -m gpt2kit train ...`) is the CLI."""

import sys

from .cli import main

sys.exit(main())
