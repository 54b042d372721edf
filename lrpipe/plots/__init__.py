"""Figures, each a pure function of a long-form DataFrame returning a matplotlib Figure: the
sweep (``sweep``), the search (``search``), update ratios (``ratios``), decay, transfer and
surfaces."""
