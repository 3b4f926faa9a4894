"""``python -m corda_kernels`` runs the ``corda-kernels`` command."""

from .cli import main

raise SystemExit(main())
