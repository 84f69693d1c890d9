"""The one exception type for user errors, and the one translation of file-system errors into them.

Anything the user can fix (a bad flag, a missing file, a corrupt checkpoint, a full disk) raises `UserError`
with one sentence that names the problem and the fix. The CLI prints it as one line (markup escaped, so a
path or value holding `[/x]` prints as written) and exits with code 2. `assert` is kept for internal
invariants only.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem in the user's input; the message is one line naming the problem and the fix."""


_OS_PROBLEMS = {
    errno.ENOSPC: ("no space is left on the device holding {path}", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded for {path}", "free some space or write to another disk"),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable folder"),
    errno.EACCES: ("permission denied for {path}", "choose a folder you may write to, or fix its permissions"),
    errno.EPERM: ("the operation is not permitted on {path}", "choose a folder you may write to, or fix its "
                  "permissions"),
    errno.ENOTDIR: ("a part of {path} is a file where a folder should be", "choose another path"),
    errno.EISDIR: ("{path} is a folder where a file should be", "choose another path"),
    errno.EEXIST: ("{path} already exists", "remove it or choose another path"),
    errno.ENOENT: ("{path} does not exist", "check the path"),
}


def os_error(e: OSError, doing: str = "") -> UserError:
    """A one-line UserError for a file-system error: what failed on which path, and the fix. `doing`
    (e.g. "writing checkpoint step_0000200") says what we were about."""
    path = e.filename if e.filename is not None else "a file"
    problem, fix = _OS_PROBLEMS.get(e.errno, ("{path}: " + (e.strerror or str(e)), "check the path and the disk"))
    what = f"{doing} failed: " if doing else ""
    return UserError(f"{what}{problem.format(path=path)}; {fix}")


def warn(message: str) -> None:
    """Print `warning: message` on stderr as one line, markup escaped."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]warning:[/] {escape(message)}")
