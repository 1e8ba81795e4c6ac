"""The one exception type that means "the user gave us something we cannot use".

Every message is a single line that names the file, field or value at fault. The CLI prints it
as ``error: <message>`` and exits non-zero; anything else that escapes is a bug in this project.
"""


class UserInputError(ValueError):
    """Bad input from a user: an unknown name, a missing file, a wrong value."""
