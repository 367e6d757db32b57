"""The two kinds of failure a command reports: bad usage (exit 2) and a failed run (exit 1)."""


class CbirError(Exception):
    """A failure with a message meant for the user, printed as one line."""

    exit_code = 1


class UsageError(CbirError):
    """Bad settings, arguments or inputs: nothing was run."""

    exit_code = 2
