"""``python -m pyckpt``: see ``python -m pyckpt --help``."""

from .cli import main

raise SystemExit(main())
