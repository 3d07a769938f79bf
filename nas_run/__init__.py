"""The `nas-run` command line; the only package that sees search_spaces, nas and compress."""

__all__: list[str] = []
