"""The one exception type for mistakes a user can make (config, data, CLI, models).

Launchers catch it, print its message on one line and exit with code 2, so a typo never
ends in a traceback from deep inside torch.
"""


class PoclError(Exception):
    """A user-facing error: the message names the file/line/field at fault and the fix."""
