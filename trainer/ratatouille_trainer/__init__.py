"""ratatouille-trainer: everything a child Job of a RatatouilleRun executes.

Importing the package is cheap and pure: torch and timm are only imported by the stage modules.
"""
__version__ = "0.1.0"
