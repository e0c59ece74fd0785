"""Entry point of ``python -m bridge`` and of the ``zkbridge`` command."""

import gc
import sys


def main() -> int:
    # Importing the bridge makes some 55,000 objects that live as long as the
    # process. With the cycle collector on, it ran about 130 times over them
    # as they were made: some 60 ms of CPU at every start, and a bridge's
    # start is on the critical path of a catch-up. The daemon freezes them
    # and turns it back on (bridge.daemon); a one-shot command turns it back
    # on once its arguments are parsed (bridge.cli.main).
    gc.disable()
    from bridge.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
