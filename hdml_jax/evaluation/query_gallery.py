"""Which rows are queries and which are gallery items: Open Metric Learning's ``is_query`` /
``is_gallery`` semantics, in NumPy (no device work).

Every evaluation row may be a query, a gallery item or both. A query is searched among the
gallery rows other than its own row, so a row that is both finds the other rows of its class but
never itself. Every row both is self-retrieval (CUB, Cars, SOP); query and gallery rows disjoint is
In-Shop's layout. A query whose class has no other gallery row cannot be scored: the metrics
leave it out (or count it as a miss, as OML does), and the evaluation says how many there were.
"""

from __future__ import annotations

import numpy as np


def role_mask(mask, rows: int, name: str) -> np.ndarray:
    """``mask`` as ``(rows,)`` bool (None: every row); ``ValueError`` for anything else."""
    if mask is None:
        return np.ones(rows, bool)
    values = np.asarray(mask)
    if values.dtype != np.bool_ or values.shape != (rows,):
        raise ValueError(
            f"{name} must be a ({rows},) bool array, one flag per embedding row; got dtype "
            f"{values.dtype}, shape {values.shape}."
        )
    return values


def query_gallery_rows(
    num_rows: int, is_query=None, is_gallery=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(query_rows, gallery_rows, self_column)`` of one set of rows with query/gallery flags.

    ``query_rows`` ``(Q,)`` and ``gallery_rows`` ``(G,)`` are row indices in order; ``self_column``
    ``(Q,)`` int32 is each query's position among the gallery rows, -1 when it is not one of them.
    """
    is_query = role_mask(is_query, num_rows, "is_query")
    is_gallery = role_mask(is_gallery, num_rows, "is_gallery")
    query_rows, gallery_rows = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    position = np.full(num_rows, -1, np.int32)
    position[gallery_rows] = np.arange(gallery_rows.size, dtype=np.int32)
    return query_rows, gallery_rows, position[query_rows]


def same_class_counts(query_labels: np.ndarray, reference_labels: np.ndarray) -> np.ndarray:
    """``(Q,)`` int64: how many references share each query's label."""
    ordered = np.sort(np.asarray(reference_labels))
    query_labels = np.asarray(query_labels)
    return np.searchsorted(ordered, query_labels, side="right") - np.searchsorted(
        ordered, query_labels, side="left"
    )


def count_unmatched_queries(labels, is_query=None, is_gallery=None) -> tuple[int, int]:
    """``(unmatched, queries)``: how many queries have no other gallery row of their class.

    Those are the queries ``metrics.retrieval_metrics`` leaves out (``unmatched_queries="skip"``).
    """
    labels = np.asarray(labels).reshape(-1)
    query_rows, gallery_rows, self_column = query_gallery_rows(labels.shape[0], is_query, is_gallery)
    others = same_class_counts(labels[query_rows], labels[gallery_rows]) - (self_column >= 0)
    return int(np.sum(others <= 0)), int(query_rows.size)


def unmatched_note(unmatched: int, queries: int, what: str = "evaluation") -> str | None:
    """The one-line note about left-out queries (None when there are none)."""
    if unmatched == 0:
        return None
    return (
        f"note: {unmatched} of the {queries} {what} queries have no other gallery image of their "
        "class and are left out of the retrieval scores."
    )
