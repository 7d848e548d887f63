def add(a: int, b: int) -> int:
    """Another add."""
    return a - b
