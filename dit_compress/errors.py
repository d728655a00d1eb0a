"""Errors that the CLI turns into one clear line and an exit code."""


class DitcError(Exception):
    """A user-facing failure. ``exit_code`` is 1 for runtime problems, 2 for usage."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(DitcError):
    """Bad arguments: wrong pattern, unknown option value, conflicting flags."""

    exit_code = 2


class FormatError(DitcError):
    """A checkpoint that cannot be read: corrupt, truncated, unknown layout, mismatching keys."""


class TrainingError(DitcError):
    """A training run that cannot continue (NaN loss, data mismatch)."""


class MissingFactError(UsageError):
    """A checkpoint does not state a fact (e.g. heads of an unpublished size) and the user
    did not supply it: the message names the fact and the option that supplies it."""
