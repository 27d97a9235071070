"""The errors a person can fix: one family, so the CLI catches them once and prints one `Error:` line.

Every message is written for a person: it names the file, the flag or the value and what to change. A `SwftError`
raised while a command is still reading what was typed exits 2 (see `cli.usage_stage`); one raised by work that
has started exits 1. Anything that is not a `SwftError` is a bug and keeps its traceback.

The standard bases (RuntimeError, ValueError) are kept so that code catching those still does.
`swft_lite.data.DataError` is one too (it lives beside the `Problem` rows it carries).
"""

from __future__ import annotations


class SwftError(Exception):
    """Base of every error whose message tells the user what to change."""

    exit_code = 1  # work that started; cli.usage_stage sets 2 on errors about what was typed


class ProfileError(SwftError, ValueError):
    """A profile file or override is wrong; the message names the file, the key and what was expected."""


class TrainError(SwftError, RuntimeError):
    """A run cannot start or continue; the message says why and what to change."""


class BackendError(SwftError, RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class DiskSpaceError(SwftError, RuntimeError):
    """Refused before a download: the disk that would take it has too little free space. Nothing was started, so it
    exits 2 like any other refusal of what was typed (here: a model too large for this disk)."""

    exit_code = 2


class MergeError(SwftError, RuntimeError):
    """A merge that cannot be done or did not verify. The message is for a person."""


class VerificationError(MergeError):
    """The merged model is not the trained model; `.report` holds the figures."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class GGUFError(SwftError, RuntimeError):
    """A GGUF that cannot be written or did not verify."""


class GGUFVerificationError(GGUFError):
    """The GGUF does not compute what the merged model computes; `.report` holds the figures."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
