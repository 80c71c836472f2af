"""Foundations every other layer uses: errors and exit codes (``errors``), atomic file writes
and CSV appends (``files``), the run folder's lock (``runlock``), device checks (``devices``),
config-field rules (``validation``), repeatable list options (``cli_args``) and the provenance
of a result (``provenance``: commit, dirty flag, versions, device).

May import: the standard library (torch only inside functions). Nothing else of sdiff.
"""
