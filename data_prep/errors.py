"""The one error type of the CLI: a problem with the command itself, printed as one line."""


class CommandError(Exception):
    """Bad arguments, unusable input or output paths: the command cannot run at all.

    The message names the path, flag or field at fault; ``python -m data_prep`` prints it as a
    single line and exits with status 2. Problems with single records are never this: they are
    skipped and written to the ledger.
    """
