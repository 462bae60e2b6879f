"""Scores and charts written into a run's folder."""
