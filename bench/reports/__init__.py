"""Reports: rank tables, statistics, critical-difference diagrams, LaTeX, plots and report.md/html.

Work from a results table alone (a run folder or a long-format CSV); no training code is imported
(docs/reports.md). ``design_statement`` says whether a design of k methods over N blocks can show a
significant pair at all (the run summary calls it too).
"""

from bench.reports.design import design_statement
from bench.reports.load import load_results
from bench.reports.report import ReportSummary, build_report

__all__ = ["ReportSummary", "build_report", "design_statement", "load_results"]
