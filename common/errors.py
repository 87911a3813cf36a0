"""The errors a library user can catch: "you asked for something that cannot work".

One small hierarchy, rooted in :class:`ValueError` so that code which already catches bad values
keeps working::

    ValueError
    └── FedprivError            (alias: UserInputError, the name older code and tests use)
        ├── ConfigError         a run's settings (RunConfig, a CLI option, a config key)
        ├── DataError           a dataset or its split: a file, its arrays, too few records
        └── PrivacyPolicyError  a data owner's policy or its privacy ledger
            (client.ledger.LedgerError and StateDirBusy derive from it)

The contract every raise site keeps: the message is one line that names the setting, option or
file at fault and says how to fix it, e.g.
``--noise-multiplier must be > 0 when DP is on (got -1); pass a positive value or --no-dp``.
The ``fedpriv`` command line prints every :class:`FedprivError` as ``error: <message>`` on one
line and exits with code 2 (``simulations.command.guarded``); any other exception is a bug.
"""


class FedprivError(ValueError):
    """Bad input from a user: the CLI prints its message as one line and exits with code 2.

    Catch this to catch every fedpriv input error; catch a subclass for one kind.
    """


UserInputError = FedprivError
"""The same class as :class:`FedprivError` (its first name): ``except UserInputError`` catches
every subclass, and ``raise UserInputError(...)`` raises a plain :class:`FedprivError`."""


class ConfigError(FedprivError):
    """A run setting that cannot work: an unknown key, a value out of range, options that clash."""


class DataError(FedprivError):
    """A dataset that cannot be used: missing or unreadable, malformed arrays, too few records."""


class PrivacyPolicyError(FedprivError):
    """A data owner's privacy policy that cannot be enforced, or a privacy ledger that cannot be used."""
