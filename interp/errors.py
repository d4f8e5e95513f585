"""The one exception type for user mistakes (bad config, bad path, bad layer index, bad data file).

Entry points catch it and print its message as a single line with a non-zero exit, no traceback.
"""


class UserError(ValueError):
    """A problem with what the user asked for, explained in one line."""
