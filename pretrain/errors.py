"""The one exception type for user errors.

Anything the user can fix (a bad flag, a missing file, a corrupt checkpoint) raises `UserError` with one
sentence that names the problem and the fix. The CLI prints it as one line and exits with code 2.
`assert` is kept for internal invariants only.
"""


class UserError(Exception):
    """A problem in the user's input; the message is one line naming the problem and the fix."""
