"""Using a trained run: the embedder library (``embedder``) and the ``embed``, ``search`` and
``export`` commands (``python -m hdml_jax.embed|search|export``).
"""
