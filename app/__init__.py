"""selfnorm's command-line application (``python -m app``): parsing, dispatch, printing and exit
codes; the science and the training live in ``models`` and ``data``."""
