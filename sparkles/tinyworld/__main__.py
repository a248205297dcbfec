"""``python -m sparkles.tinyworld``: generate the world (see ``cli``)."""

from .cli import main

raise SystemExit(main())
