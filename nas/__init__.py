"""Search: strategies, evaluators, runners, store."""

__all__: list[str] = []
