"""Fault injection: kill the prep and training jobs at chosen points and check that re-runs lose nothing."""
