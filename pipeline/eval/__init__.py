"""Evaluation metrics used by ``python -m pipeline.evaluate``: CKA, the shape detector, the report."""
