"""``python -m capkeeper`` and the ``capkeeper`` command."""

import signal
import sys

# The watch daemon handles these (reload, stop), but only once capkeeper is imported,
# which takes ~0.3 s (seconds under load); meanwhile SIGHUP's default action would kill
# it. A blocked signal stays pending in the kernel until the daemon, its handlers in
# place, unblocks it (capkeeper.daemon); every other command unblocks them at once.
_DAEMON_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def entry() -> int:
    """Run capkeeper, holding the daemon's signals back while it starts."""
    if "watch" in sys.argv[1:]:
        signal.pthread_sigmask(signal.SIG_BLOCK, _DAEMON_SIGNALS)
    from capkeeper.cli import main  # noqa: PLC0415 - after the signals are held back

    return main()


if __name__ == "__main__":
    sys.exit(entry())
