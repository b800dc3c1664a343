"""Conversation readers, chat templates and the prepare-data pipeline."""
