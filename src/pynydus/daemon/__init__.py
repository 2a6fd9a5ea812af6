"""pynydusd: the FUSE daemon (``main.py`` its command line, ``daemon.py`` its parts)."""

from pynydus._lean import import_argparse

import_argparse()  # first: without gettext (and locale), see _lean.py
