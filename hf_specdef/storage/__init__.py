"""Safetensors checkpoint folders on disk: validated headers and indexes, lazy reading, staging folders, the release rule."""
