"""``python -m domain_event_broker``: the ``domain-event-broker`` command-line tool."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
