"""``python -m capkeeper`` and the ``capkeeper`` command."""

import sys


def entry() -> int:
    """Run capkeeper, holding the daemon's signals back while it starts.

    The watch daemon handles SIGHUP, SIGTERM and SIGINT (reload, stop), but only once
    capkeeper is imported, which takes ~0.3 s (seconds under load); meanwhile SIGHUP's
    default action would kill it. A blocked signal stays pending in the kernel until
    the daemon, its handlers in place, unblocks it (capkeeper.daemon); any other
    command unblocks them at once (capkeeper.cli). Only a command line that names
    ``watch`` imports signal for this: the one-shot commands need not pay for it.
    """
    if "watch" in sys.argv[1:]:
        import signal  # noqa: PLC0415

        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
    from capkeeper.cli import main  # noqa: PLC0415 - after the signals are held back

    return main()


if __name__ == "__main__":
    sys.exit(entry())
