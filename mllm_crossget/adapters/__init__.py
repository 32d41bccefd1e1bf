"""One module per model family; the registry lives in :mod:`mllm_crossget.api`."""
