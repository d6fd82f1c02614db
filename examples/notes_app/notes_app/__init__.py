"""A small notes service that keeps its own tables and tracestore's in one database."""
