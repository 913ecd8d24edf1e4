"""Defaults of the embedded default corpus (:mod:`dlcm.data.corpus`) that a command line shows before building it.

Kept apart because :mod:`dlcm.data.corpus` imports the shard writer and the tokenizer, hence torch: this module
imports nothing, so ``dlcm data default-corpus --help`` can state the default without loading them.
"""

from __future__ import annotations

# All of the KJV (4.15 MB, ~1.1M tokens at 4096 ids) + 8 MB of stdlib code (~2.5M tokens); ~5 s on 2 CPU cores.
DEFAULT_MAX_BYTES_PER_DOMAIN = 8_000_000
