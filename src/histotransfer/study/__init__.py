"""The study: one YAML file -> the whole encoder x truncation x dataset x seed grid -> tables, figures, report."""

from .._lazy import lazy_exports

_EXPORTS = {"Study": ".config", "load_study": ".config", "plan": ".planner", "run_study": ".runner"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
