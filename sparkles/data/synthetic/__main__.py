"""``python -m sparkles.data.synthetic``: generate the synthetic world (see ``cli``)."""

from .cli import main

raise SystemExit(main())
