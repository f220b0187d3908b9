"""The one kind of error an entry point (a stage, ``captioner``) prints as it is, with no traceback."""


class ReportedError(RuntimeError):
    """Its message is the whole report: one paragraph saying what is wrong, where, and the way out."""
