"""Transformers, Hands-On: the course's helper package (checks, grading, plots, command line)."""

__version__ = "0.1.0"
