"""Former home of the streaming average, kept for ``ratatouille average`` in the operator's CLI
(``ratatouille_operator/cli.py`` imports it): the engine is :mod:`ratatouille_trainer.averaging`."""
from .averaging import AveragingError, UnsafeWeightsError, average_uris

__all__ = ["AveragingError", "UnsafeWeightsError", "average_uris"]
