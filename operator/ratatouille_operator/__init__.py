"""ratatouille_operator: the RatatouilleRun API (spec, validation, planner, Job manifests) and the
adapters that execute it (kopf operator, local executor) plus the `ratatouille` command line.

Importing the package is cheap: kopf and kubernetes are imported only by the operator modules.
"""
__version__ = "0.1.0"
