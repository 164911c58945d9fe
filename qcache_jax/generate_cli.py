"""``qcache generate`` (filled in with Lazy Attention generate)."""


def add_generate_parser(sub) -> None:
    return None
