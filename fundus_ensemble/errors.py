"""The project's own exceptions: every input problem a user can fix raises one of these."""


class FundusError(ValueError):
    """Base class for problems with the user's data, models or options."""


class ManifestError(FundusError):
    """A manifest or label table is malformed; the message names file, row, column and value."""


class ImageError(FundusError):
    """An image cannot be used; the message is a one-line reason for the rejects report."""


class WeightsError(FundusError):
    """Requested backbone weights cannot be obtained."""


class ModelCardError(FundusError):
    """A saved model does not match what the caller asked for."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Issue a ``UserWarning`` the first time ``message`` comes up in this process only.

    Scoring warns about the same class for every model it scores; a person needs it once.
    """
    import warnings

    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
