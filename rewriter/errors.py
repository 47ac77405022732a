"""Errors a user can act on; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: a missing or malformed model, an unknown pass or option, a bad value."""


class NotSupported(UserError):
    """A feature the tool does not implement (yet); said plainly rather than faked."""


class DoesNotRun(UserError):
    """The model does not run on the inputs given or generated."""
