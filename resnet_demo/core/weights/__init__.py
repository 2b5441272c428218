"""Checkpoints: model cards and presets, the one bounded reader, the recogniser of every supported
layout, fitting a state dict to a model, and loading.

Below the explorer and the one-image core: nothing here captures, analyses or draws.
"""
