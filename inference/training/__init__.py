"""Training of SkinBridge's own default models (classifier + explanation-image generator) on CPU.

The datasets live outside the repository (``../shared/data``); only derived weights and metrics are
shipped. See ``docs/models.md`` for the model cards.
"""
