"""Errors a user can act on; the CLI prints them as one line and exits non-zero."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a
    one-line error quotes of a library's failure."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class UserError(Exception):
    """Bad input: a missing or malformed model, an unknown pass or option, a bad value."""


class NotSupported(UserError):
    """A feature the tool does not implement (yet); said plainly rather than faked."""


class NothingFound(UserError):
    """A pass over a model with no attention site: nothing to rewrite (exit status 3 on the
    command line, unless --allow-empty)."""


class DoesNotRun(UserError):
    """The model does not run on the inputs given or generated."""
