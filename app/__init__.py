"""selfnorm's command-line application (``python -m app``)."""
