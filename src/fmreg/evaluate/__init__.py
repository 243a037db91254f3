"""Accuracy of a registration: single metrics (:mod:`~fmreg.evaluate.metrics`) and the scoring of
a registered pair with its label policy (:mod:`~fmreg.evaluate.scoring`)."""
