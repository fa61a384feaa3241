"""Report folders (json, csv, png, tex, md) from run folders."""

from attnlab.report.build import ReportFiles, write_report

__all__ = ["ReportFiles", "write_report"]
