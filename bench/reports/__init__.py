"""Reports: rank tables, statistics, critical-difference diagrams, LaTeX, plots and report.md/html.

Work from a results table alone (a run folder or a long-format CSV); no training code is imported.
"""

from bench.reports.load import load_results
from bench.reports.report import ReportSummary, build_report

__all__ = ["ReportSummary", "build_report", "load_results"]
