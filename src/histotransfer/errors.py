"""User-facing errors: each message names the file at fault and the fix."""


class HistotransferError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class FormatError(HistotransferError):
    """A file does not follow the layout (or version) that this stage reads."""
