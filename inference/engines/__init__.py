"""Model engines: the project's classifier, an optional vision-language model, and the generators
of AI-generated explanation images. Each engine loads from a local folder only (nothing is
downloaded at run time) and returns results in the shared :class:`~inference.engines.base.Prediction`."""
