"""The one exception type for user errors (bad input, bad files, bad options).

The CLI prints such errors as one line without a traceback; anything else is a bug and keeps
its traceback.
"""


class QCacheError(ValueError):
    """A problem with the user's input: a path, a file, a shape, an option."""
