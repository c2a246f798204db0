"""Looking up a name among the known ones, with an error that suggests the closest."""
import difflib


def lookup(table, name, what):
    """`table[name]`; an unknown name raises a KeyError naming `what` it should be, the closest known names and all
    of them."""
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown {what} {name!r}{hint} (known: {', '.join(sorted(table))})")
    return table[name]
