"""The one kind of error an entry point (a stage, ``captioner``) prints as it is, with no traceback."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it): what a one-paragraph
    report quotes of an exception from a library, whose messages run to pages and links."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:limit]}"


class ReportedError(RuntimeError):
    """Its message is the whole report: one paragraph saying what is wrong, where, and the way out."""
