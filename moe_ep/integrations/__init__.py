"""Integrations with model libraries (each imports its library lazily).

* :mod:`moe_ep.integrations.transformers`: ``expert_parallel(model, group, ...)`` and
  ``from_pretrained(checkpoint_dir, group, ...)`` for Hugging Face MoE models (the ``hf``
  extra: ``pip install moe-ep[hf]``).
"""
