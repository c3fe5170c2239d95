"""The one exception type for a user's mistake: scripts print it as one line, no traceback."""


class UserError(Exception):
    """Unusable input or config. The message names the file/row/key and what is wrong."""
