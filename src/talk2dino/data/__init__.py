"""Image loading and conversion (RGB everywhere, method.md pitfall P1)."""
