"""The one error type every reader and converter raises."""


class FormatError(ValueError):
    """A checkpoint file is unreadable, truncated, of an unknown layout or of another architecture.

    The message always names the file (when there is one) and what was found instead of what was expected.
    """
