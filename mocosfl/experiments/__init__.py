"""Named experiment suites (``suites``: data tables only) and what turns a row into a run (``rows``).

``mocosfl results`` (pipelines/results.py) loops over a suite, caching, rendering and logging each row.
"""
