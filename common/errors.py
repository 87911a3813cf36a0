"""The one exception type that means "the user asked for something that cannot work"."""


class UserInputError(Exception):
    """Bad input from a user: the CLI prints its message as one line and exits non-zero.

    Messages name the option at fault and the fix, e.g.
    ``--noise-multiplier must be > 0 when DP is on (got -1); pass a positive value or --no-dp``.
    """
