"""LIKENESS_CONCEPT: the concept type, its text/embedding sources and prompt injection."""
