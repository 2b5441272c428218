"""Studies over a data set: bands, probe fitting, strangeness, lesion scans, the error scan, exemplars,
block similarity, the training timeline, feature visualisation, evaluation and labelled sets, and the
torchrun job they share.

Each study takes an :class:`~resnet_demo.core.explorer.Explorer` (or, in the training commands, the model
and its input normalisation); nothing below this package imports it.
"""
