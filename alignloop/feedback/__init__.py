"""The feedback web app: people compare model responses; the export is training data.

`alignloop.feedback.app.create_app(settings)` builds the FastAPI app (no import-time globals); the
tables live in `db.py`, their migrations in `migrations/`. The package must not import torch: its only
link to training is the record types of `alignloop.data` that its export writes and its import reads.
Guide: docs/feedback.md.
"""
