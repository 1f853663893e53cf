"""`python -m tessera.gateway --model PATH ...`: the same as `tessera serve`."""

import sys

from tessera.gateway.cli import main_serve

raise SystemExit(main_serve(sys.argv[1:]))
