"""The HTML report for people: one self-contained page rendered from the typed report (`AuditReport`, with the
policy verdict). Inline CSS, plots as inline SVG drawn by matplotlib, no script and no reference to anything
outside the page, so it opens offline, in a mail attachment or printed.

The worker renders it once when an audit succeeds; the web process only serves the stored bytes and never
imports this package (matplotlib stays out of the HTTP process).

format: how numbers are written; index: where the page finds things in the report; plots, prose, tables: the
figures, sentences and table rows; page: the sections and the template."""

from worker.report_html.page import render_report_html

__all__ = ["render_report_html"]
