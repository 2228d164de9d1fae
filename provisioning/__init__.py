"""Technician tools: identities, credentials, broker configuration and whole deployments."""
