"""Data sets, training, evaluation, evaluation sets and the commands that fill model cards.

Uses the core; never imported by the core, the view or the app.
"""
