"""What several commands parse alike."""
import ast


def parse_option(text: str):
    """'s_churn=40' -> ('s_churn', 40.0); values are Python literals, else strings."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ValueError(f"--option {text!r} must look like NAME=VALUE (e.g. --option s_churn=40)")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value
