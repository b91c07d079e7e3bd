"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QuerytuneError(Exception):
    """A problem with the user's input (files, options, checkpoints), named in the message."""


class DataError(QuerytuneError):
    """A data folder, list file or image that cannot be used."""


class CheckpointError(QuerytuneError):
    """A checkpoint or run folder that does not fit what is asked of it."""


class StorageError(QuerytuneError):
    """A folder that cannot take what is written to it: no space, read-only, no permission."""


class ConfigError(QuerytuneError):
    """An unknown or inapplicable option."""


class DivergedError(QuerytuneError):
    """A training run whose loss is no longer a number (NaN or infinite)."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (for embedding in a QuerytuneError)."""
    return " ".join(str(error).split()) or type(error).__name__
