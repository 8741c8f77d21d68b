"""torch building blocks: the activation registry (``activations``), weight-centralized convs and
linears with the norm registry and initialisations (``centralized``), and alpha dropout."""
