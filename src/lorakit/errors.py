"""The one exception type a user of lorakit sees for their own mistakes.

Library code raises :class:`LorakitError` with a message that names the bad value
and says what to do; the CLI prints it as one line on stderr and exits with code 2.
"""


class LorakitError(ValueError):
    """A user's input (a value, a file, a flag) cannot be used as given."""
