"""Scoring embeddings: retrieval metrics (``metrics``), k-means and NMI (``cluster``), the finite
check (``finite``), the trainer's evaluation (``evaluate``), pictures and the TensorBoard projector.
"""
