"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`)."""

from lorakit.cli import main

raise SystemExit(main())
