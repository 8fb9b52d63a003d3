"""MLflow: where runs go (stores), the names that tie them together (names), what a run records (record,
delivery), secrets kept out of logs (secrets), links into the UI (links) and reading runs back (queries).

Imports fashioncnn.core only. Imported by every layer above it.
"""
