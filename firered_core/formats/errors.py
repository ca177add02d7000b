"""The one error type every reader and converter raises."""

from ..errors import FireRedError


class FormatError(FireRedError):
    """A checkpoint file is unreadable, truncated, of an unknown layout or of another architecture.

    The message always names the file (when there is one) and what was found instead of what was expected.
    """
