"""User-facing errors: each message names the file at fault and the fix."""


class HistotransferError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class FormatError(HistotransferError):
    """A file does not follow the layout (or version) that this stage reads."""


class ProvenanceError(HistotransferError):
    """An input is not the one a stage's earlier output was made from (another slide, tiling or run)."""


def one_line(exc: BaseException) -> str:
    """A single-line description of an exception."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__
