"""Zero-shot evaluation: task loaders (``tasks``), packed log-likelihood scoring (``scoring``), ``dlcm eval``."""
