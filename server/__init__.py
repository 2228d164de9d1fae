"""The central server: ingest, incidents, supervision and the HTTP API."""
