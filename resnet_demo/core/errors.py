"""The errors the core raises for bad input, with messages meant for a person; the page shows them as they are.

Both are ``ValueError``s. They live apart from the code that raises them so that the app can catch them
without importing anything else from the core.
"""

__all__ = ["DataError", "InputError", "WeightsError"]


class InputError(ValueError):
    """The input cannot be analysed; the message says why in plain words."""


class WeightsError(ValueError):
    """A weights file (or its card) that cannot be read or does not fit the model; the message names the file."""


class DataError(ValueError):
    """A data set that cannot be found or read; the message names it and says what was expected."""
