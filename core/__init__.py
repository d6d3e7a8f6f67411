"""Core concerns shared by every layer: settings, errors, logging."""
