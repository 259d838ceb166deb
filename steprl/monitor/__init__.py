"""Monitoring: metrics logging with a live doctor, post-hoc diagnosis, HTML reports, run comparison.

The report/compare functions are imported lazily: they pull in matplotlib (~0.5 s), which a
training process that only logs metrics should not pay for."""
from .doctor import Finding, diagnose, doctor_dir, main_doctor
from .logger import MetricsLogger

__all__ = ["MetricsLogger", "Finding", "diagnose", "doctor_dir", "main_doctor", "write_report",
           "main_report", "write_compare"]


def __getattr__(name):
    if name in ("write_report", "main_report"):
        from . import report
        return getattr(report, name)
    if name == "write_compare":
        from .compare import write_compare
        return write_compare
    raise AttributeError(f"module 'steprl.monitor' has no attribute {name!r}")
