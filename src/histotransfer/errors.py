"""User-facing errors: each message names the file at fault and the fix."""


class HistotransferError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class RankFailure(HistotransferError):
    """A process of a torchrun job failed: every process of the job stops with that process's message, which
    each has already printed as its :func:`error_line`."""


class FormatError(HistotransferError):
    """A file does not follow the layout (or version) that this stage reads."""


class ProvenanceError(HistotransferError):
    """An input is not the one a stage's earlier output was made from (another slide, tiling or run)."""


def one_line(exc: BaseException) -> str:
    """A single-line description of an exception."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


_command = ["histotransfer"]


def set_command(name: str) -> None:
    """The command whose errors :func:`error_line` words (set by the command line before it runs one)."""
    _command[0] = f"histotransfer {name}"


def error_line(message: str) -> str:
    """The one line a failed command prints."""
    return f"{_command[0]}: error: {message}"
