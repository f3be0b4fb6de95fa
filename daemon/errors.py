"""The ``runrelay`` command's exit codes and the error a user can fix (docs/cli.md)."""

EXIT_OK = 0
EXIT_UNDELIVERED = 1  # something is left undelivered, or a loop crashed, or shutdown overran
EXIT_CORRUPT = EXIT_UNDELIVERED  # `journal verify` / `cat`: a corrupt run is never delivered either
EXIT_USAGE = 2  # bad configuration or arguments: nothing was done
EXIT_SIGNALLED = 128  # + the signal's number, as a shell reports a process killed by it


class UserError(Exception):
    """Something the user can fix; printed as one line, exit 2."""
