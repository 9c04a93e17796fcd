"""The one exception type for problems a user can fix (bad input, missing files, wrong config).

The message is one line that names the file (or setting) and says what to fix; the CLI prints it as is.
"""


class SatdetError(RuntimeError):
    """A user-fixable problem, reported as a single line."""
