"""The supervised training curriculum (stages 0-4) and its data."""
