"""Experiment scripts that compare model variants with tables and plots (see README.md)."""
