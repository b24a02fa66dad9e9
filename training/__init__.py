"""Training utilities (see issue: training utilities and TAIA)."""
